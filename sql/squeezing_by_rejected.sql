-- Squeezing per kind of rejected answer: does DPO's argmax path y* gain more when y- is unlike y+? (A measurement
-- the paper does not have: it predicts that pushing down a y- that shares tokens with y+ drags y+ down with it.)
-- Each run's first and last evaluation, per probe prompt, grouped two ways:
--   bucket_by = 'rejected_kind'  the dataset's own label of y- (the built-in world records one per example:
--                                wrong_value, off_topic, refusal, unrelated, from most to least like y+)
--   bucket_by = 'word_overlap'   the measured overlap of y- with y+ (table probe_pairs), in bins
--                                '0.0-0.1', '0.1-0.2', '0.2-0.3', '0.3-1.0' (any dataset)
-- One row per (run_id, bucket_by, bucket). Columns:
--   run_id, phase, bucket_by, bucket
--   n_examples            probe prompts in the bucket
--   mean_word_overlap     mean word overlap of y- with y+ in the bucket
--   delta_argmax          mean change of log pi(y*|x) from the run's first to its last evaluation (nats)
--   delta_chosen          mean change of log pi(y+|x)
--   delta_gap             mean change of log pi(y*) - log pi(y+) (= delta_argmax - delta_chosen)
--   gap_per_token_start, gap_per_token_end   mean (log pi(y*) - log pi(y+)) / tokens at the two evaluations
--   repeater_rate_start, repeater_rate_end   share of the bucket's greedy generations with a repeated word
--                         n-gram at the run's start and final checkpoints (table generation_borrowing; null
--                         until the borrowing analysis has run)
with chosen as (
    select run_id, phase, example_id, step, logp_sum, argmax_logp_sum, n_tokens
    from trajectories
    where response_type = 'chosen'
),
span as (
    select run_id, min(step) as s0, max(step) as s1 from chosen group by run_id
),
per as (
    select a.run_id, a.phase, a.example_id,
        b.logp_sum - a.logp_sum as d_chosen,
        b.argmax_logp_sum - a.argmax_logp_sum as d_argmax,
        (a.argmax_logp_sum - a.logp_sum) / a.n_tokens as gap0,
        (b.argmax_logp_sum - b.logp_sum) / b.n_tokens as gap1
    from chosen a
    join span s on a.run_id = s.run_id and a.step = s.s0
    join chosen b on b.run_id = a.run_id and b.example_id = a.example_id and b.step = s.s1
),
gen as (
    select run_id, example_id,
        bool_or(repeats) filter (where checkpoint = 'start') as rep0,
        bool_or(repeats) filter (where checkpoint = 'final') as rep1
    from generation_borrowing
    where split = 'train'
    group by run_id, example_id
),
joined as (
    select per.*, p.rejected_kind, p.word_overlap, g.rep0, g.rep1
    from per
    join probe_pairs p on p.experiment = split_part(per.run_id, '.', 1) and p.example_id = per.example_id
    left join gen g on g.run_id = per.run_id and g.example_id = per.example_id
),
buckets as (
    select *, 'rejected_kind' as bucket_by, rejected_kind as bucket from joined where rejected_kind is not null
    union all
    select *, 'word_overlap' as bucket_by,
        case when word_overlap < 0.1 then '0.0-0.1' when word_overlap < 0.2 then '0.1-0.2'
             when word_overlap < 0.3 then '0.2-0.3' else '0.3-1.0' end as bucket
    from joined
)
select
    run_id,
    any_value(phase) as phase,
    bucket_by,
    bucket,
    count(*) as n_examples,
    avg(word_overlap) as mean_word_overlap,
    avg(d_argmax) as delta_argmax,
    avg(d_chosen) as delta_chosen,
    avg(d_argmax - d_chosen) as delta_gap,
    avg(gap0) as gap_per_token_start,
    avg(gap1) as gap_per_token_end,
    avg(rep0::double) as repeater_rate_start,
    avg(rep1::double) as repeater_rate_end
from buckets
group by run_id, bucket_by, bucket
order by run_id, bucket_by, bucket
