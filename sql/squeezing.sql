-- Squeezing over training: log pi(y*) against log pi(y+) on the probe prompts, from the trajectories, with the
-- diagnostics that say whether a setting CAN squeeze (ldpipe.analysis.squeezing.squeeze_diagnostics computes
-- the same numbers in Python; a test keeps the two equal).
-- y* is the teacher-forced argmax path along y+ (argmax_logp_sum = sum_t log max_v pi(v | x, y+_<t)).
-- Under off-policy DPO the argmax path gains and pulls away from y+ (check dpo_squeezing_argmax_rises). Filter
-- phase = 'dpo' for that; SFT rows are kept for comparison. Model-side statistics per checkpoint (peakiness,
-- repeater rate) are in the table generation_stats; squeezing per kind of rejected answer in the view
-- squeezing_by_rejected.
-- One row per (run_id, phase, step). Columns:
--   run_id, phase, step, epoch
--   n_examples       probe prompts averaged
--   mean_logp_chosen mean log pi(y+|x) (nats, summed over response tokens)
--   mean_logp_argmax mean log pi(y*|x)
--   delta_chosen     mean change of log pi(y+|x) since the run's first evaluation
--   delta_argmax     mean change of log pi(y*|x) since the run's first evaluation
--   argmax_gap       mean of log pi(y*|x) - log pi(y+|x) (>= 0; grows when mass is squeezed off y+)
--   delta_gap        mean change of argmax_gap since the run's first evaluation (= delta_argmax - delta_chosen)
--   gap_per_token    mean over prompts of (log pi(y*) - log pi(y+)) / tokens of y+: how far y+ is from the
--                    model's own argmax path per token. Near 0: y+ is memorised token by token and y* cannot
--                    pull away from it (nothing to squeeze into)
--   argmax_share     share of y+'s token positions where the y+ token is the argmax (null for shards written
--                    before the argmax_match column existed)
--   rejected_logp_per_token  mean over prompts of log pi(y-)/tokens ("valley depth": the paper's squeeze is
--                    strongest when DPO pushes down a y- that already sits in a low-probability valley)
select
    run_id,
    phase,
    step,
    any_value(epoch) as epoch,
    count(*) filter (where response_type = 'chosen') as n_examples,
    avg(logp_sum) filter (where response_type = 'chosen') as mean_logp_chosen,
    avg(argmax_logp_sum) filter (where response_type = 'chosen') as mean_logp_argmax,
    avg(logp_sum - first_logp) filter (where response_type = 'chosen') as delta_chosen,
    avg(argmax_logp_sum - first_argmax) filter (where response_type = 'chosen') as delta_argmax,
    avg(argmax_logp_sum - logp_sum) filter (where response_type = 'chosen') as argmax_gap,
    avg((argmax_logp_sum - logp_sum) - (first_argmax - first_logp)) filter (where response_type = 'chosen')
        as delta_gap,
    avg((argmax_logp_sum - logp_sum) / n_tokens) filter (where response_type = 'chosen') as gap_per_token,
    sum(argmax_match) filter (where response_type = 'chosen')
        / sum(n_tokens) filter (where response_type = 'chosen' and argmax_match is not null) as argmax_share,
    avg(logp_mean) filter (where response_type = 'rejected') as rejected_logp_per_token
from (
    select *,
        first_value(logp_sum) over (partition by run_id, response_type, example_id order by step) as first_logp,
        first_value(argmax_logp_sum) over (partition by run_id, response_type, example_id order by step)
            as first_argmax
    from trajectories
    where response_type in ('chosen', 'rejected')
)
group by run_id, phase, step
having count(*) filter (where response_type = 'chosen') > 0
order by run_id, step
