-- LLM-judge win rate of checkpoint a's generations over checkpoint b's (table win_rate_judgments).
-- Every prompt is judged in both A/B orders, so position bias cancels; ties and unparsable verdicts are counted.
-- One row per (experiment, model_a, model_b, judge_model). Columns:
--   experiment, model_a, model_b  checkpoint references ("<run>" = its final, "<run>@start", "base", ...)
--   judge_model
--   n_prompts, n_judgments        prompts judged, judgments (2 per prompt)
--   wins_a, wins_b, ties, unparsable
--   win_rate_a        (wins_a + ties / 2) / (wins_a + wins_b + ties); unparsable verdicts excluded
--   first_slot_share  share of A/B verdicts naming the first slot ("Response A"): 0.5 = no position bias
select
    experiment,
    model_a,
    model_b,
    judge_model,
    count(distinct example_id) as n_prompts,
    count(*) as n_judgments,
    count(*) filter (where winner = 'a') as wins_a,
    count(*) filter (where winner = 'b') as wins_b,
    count(*) filter (where winner = 'tie') as ties,
    count(*) filter (where winner = 'unparsable') as unparsable,
    (count(*) filter (where winner = 'a') + 0.5 * count(*) filter (where winner = 'tie'))
        / nullif(count(*) filter (where winner in ('a', 'b', 'tie')), 0) as win_rate_a,
    avg(case when verdict = 'A' then 1.0 when verdict = 'B' then 0.0 end) as first_slot_share
from win_rate_judgments
group by experiment, model_a, model_b, judge_model
order by experiment, model_a, model_b
