-- Learning curves: how log pi(y|x) of each response type moves during each run.
-- One row per (run_id, phase, step, response_type).
-- Columns:
--   run_id, phase, step, epoch, response_type
--   n_examples   number of probe prompts averaged
--   mean_logp    mean over probe prompts of sum_t log pi(y_t | x, y_<t)   (nats)
--   std_logp     spread (sample std) of that sum over probe prompts
--   mean_delta   mean change of the sum since the run's first evaluation (compare changes, not levels:
--                sums depend strongly on response length); mean_logp minus mean_logp at the first
--                evaluation, which is the mean per-probe change because every evaluation scores the
--                same probe set
--   mean_logp_per_token  mean of logp_sum / n_tokens
--   mean_argmax  mean teacher-forced log pi(y*) = sum_t log max_v pi(v | x, y_<t)
--   mean_A_o, mean_p_e, mean_energy, mean_except_argmax   means over probe prompts of the per-sequence
--                metrics A_o, p_e, energy, except_argmax (ldpipe.schema TRAJECTORY_SCHEMA; null for shards
--                written before these columns existed)
with agg as (
    select
        run_id,
        phase,
        step,
        any_value(epoch) as epoch,
        response_type,
        count(*) as n_examples,
        avg(logp_sum) as mean_logp,
        stddev_samp(logp_sum) as std_logp,
        avg(logp_mean) as mean_logp_per_token,
        avg(argmax_logp_sum) as mean_argmax,
        avg(A_o) as mean_A_o,
        avg(p_e) as mean_p_e,
        avg(energy) as mean_energy,
        avg(except_argmax) as mean_except_argmax
    from trajectories
    group by run_id, phase, step, response_type
),
firsts as (
    -- the mean at each (run, type)'s first evaluation; every evaluation scores the whole probe set, so
    -- mean_logp - first_logp is the mean per-probe change (one aggregate pass over the rows, no join of
    -- all rows: `ldpipe bench sql` times it on 10M rows)
    select run_id, response_type, arg_min(mean_logp, step) as first_logp
    from agg
    group by run_id, response_type
)
select
    run_id, phase, step, epoch, response_type, n_examples, mean_logp, std_logp,
    mean_logp - first_logp as mean_delta,
    mean_logp_per_token, mean_argmax, mean_A_o, mean_p_e, mean_energy, mean_except_argmax
from agg
join firsts using (run_id, response_type)
order by run_id, step, response_type
