-- Learning curves: how log pi(y|x) of each response type moves during each run.
-- One row per (run_id, phase, step, response_type).
-- Columns:
--   run_id, phase, step, epoch, response_type
--   n_examples   number of probe prompts averaged
--   mean_logp    mean over probe prompts of sum_t log pi(y_t | x, y_<t)   (nats)
--   std_logp     spread (sample std) of that sum over probe prompts
--   mean_delta   mean change of the sum since the run's first evaluation (compare changes, not levels:
--                sums depend strongly on response length)
--   mean_logp_per_token  mean of logp_sum / n_tokens
--   mean_argmax  mean teacher-forced log pi(y*) = sum_t log max_v pi(v | x, y_<t)
--   mean_A_o, mean_p_e, mean_energy, mean_except_argmax   means over probe prompts of the per-sequence
--                metrics A_o, p_e, energy, except_argmax (ldpipe.schema TRAJECTORY_SCHEMA; null for shards
--                written before these columns existed)
with firsts as (
    -- each probe's log-prob at its first evaluation in the run (a hash aggregate: much cheaper than a
    -- window over all rows; `ldpipe bench sql` compares the two)
    select run_id, example_id, response_type, arg_min(logp_sum, step) as logp_first
    from trajectories
    group by run_id, example_id, response_type
)
select
    run_id,
    phase,
    step,
    any_value(epoch) as epoch,
    response_type,
    count(*) as n_examples,
    avg(logp_sum) as mean_logp,
    stddev_samp(logp_sum) as std_logp,
    avg(logp_sum - logp_first) as mean_delta,
    avg(logp_mean) as mean_logp_per_token,
    avg(argmax_logp_sum) as mean_argmax,
    avg(A_o) as mean_A_o,
    avg(p_e) as mean_p_e,
    avg(energy) as mean_energy,
    avg(except_argmax) as mean_except_argmax
from trajectories
join firsts using (run_id, example_id, response_type)
group by run_id, phase, step, response_type
order by run_id, step, response_type
