-- Squeezing over training: log pi(y*) against log pi(y+) on the probe prompts, from the trajectories.
-- y* is the teacher-forced argmax path along y+ (argmax_logp_sum = sum_t log max_v pi(v | x, y+_<t)).
-- Under off-policy DPO the paper sees y* rise while y+ falls (learning-dynamics.md §8). Filter phase = 'dpo'
-- for that; SFT rows are kept for comparison. Model-side statistics per checkpoint (peakiness, repeater rate)
-- are in the table generation_stats.
-- One row per (run_id, phase, step). Columns:
--   run_id, phase, step, epoch
--   n_examples       probe prompts averaged
--   mean_logp_chosen mean log pi(y+|x) (nats, summed over response tokens)
--   mean_logp_argmax mean log pi(y*|x)
--   delta_chosen     mean change of log pi(y+|x) since the run's first evaluation
--   delta_argmax     mean change of log pi(y*|x) since the run's first evaluation
--   argmax_gap       mean of log pi(y*|x) - log pi(y+|x) (>= 0; grows when mass is squeezed off y+)
select
    run_id,
    phase,
    step,
    any_value(epoch) as epoch,
    count(*) as n_examples,
    avg(logp_sum) as mean_logp_chosen,
    avg(argmax_logp_sum) as mean_logp_argmax,
    avg(logp_sum - first_chosen) as delta_chosen,
    avg(argmax_logp_sum - first_argmax) as delta_argmax,
    avg(argmax_logp_sum - logp_sum) as argmax_gap
from (
    select *,
        first_value(logp_sum) over (partition by run_id, example_id order by step) as first_chosen,
        first_value(argmax_logp_sum) over (partition by run_id, example_id order by step) as first_argmax
    from trajectories
    where response_type = 'chosen'
)
group by run_id, phase, step
order by run_id, step
