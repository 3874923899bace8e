-- TracIn-style accumulated influence: per method and (update, observed probe) pair, the sum over the
-- analysed checkpoints of lr_eff_t x influence_t (the `value` column of store table `influence`).
-- One row per (run_id, method, train_example_id, train_response_type, observed_example_id, observed_response_type).
-- Columns:
--   run_id, method                 method: exact | projected | naive | naive_optimizer | exact_precond |
--                                  projected_precond (optimizer-preconditioned; only checkpoints with saved
--                                  optimizer state, so n_checkpoints may be smaller than for exact)
--   train_example_id, train_response_type      the update (SFT: supervised type; DPO/IPO: "dpo"/"ipo")
--   observed_example_id, observed_response_type  the probe whose log pi moves
--   same_prompt     observed_example_id = train_example_id
--   accumulated     sum over checkpoints of value (nats: predicted, or realised for naive methods)
--   n_checkpoints   checkpoints summed
--   first_step, last_step   checkpoint steps covered
select
    run_id,
    method,
    train_example_id,
    train_response_type,
    observed_example_id,
    observed_response_type,
    observed_example_id = train_example_id as same_prompt,
    sum(value) as accumulated,
    count(*) as n_checkpoints,
    min(checkpoint_step) as first_step,
    max(checkpoint_step) as last_step
from influence
group by all
order by run_id, method, train_example_id, train_response_type, observed_example_id, observed_response_type
