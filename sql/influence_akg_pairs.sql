-- A-K-G per (update, observed) pair: store table `akg` summed over the observed response's tokens.
-- Delta log pi(y|x) ~= sum_t -lr_eff [A K G]_{y_t}; `predicted` is that first-order sum (it equals
-- lr_eff x the exact eNTK entry), `realised` the change after a real SGD step of lr_eff.
-- One row per (run_id, checkpoint, checkpoint_step, train_example_id, train_response_type,
--              observed_example_id, observed_response_type).
-- Columns:
--   n_tokens        observed response tokens
--   lr_eff          step size (lr * clip / batch_size)
--   mean_pi_token   mean pi(y_t) before the update (A's factor: 1 - pi(y_t) on its own token)
--   mean_kg_token   mean (K G)[y_t];  mean_kg_expect: mean pi . (K G)
--   g_norm          ||G|| of the update
--   predicted, realised   summed Delta log pi (nats)
--   linearisation_error   |realised - predicted| / |realised|
select
    run_id,
    checkpoint,
    checkpoint_step,
    train_example_id,
    train_response_type,
    observed_example_id,
    observed_response_type,
    count(*) as n_tokens,
    any_value(lr_eff) as lr_eff,
    avg(pi_token) as mean_pi_token,
    avg(kg_token) as mean_kg_token,
    avg(kg_expect) as mean_kg_expect,
    any_value(g_norm) as g_norm,
    sum(predicted_delta) as predicted,
    sum(realised_delta) as realised,
    abs(sum(realised_delta) - sum(predicted_delta)) / nullif(abs(sum(realised_delta)), 0) as linearisation_error
from akg
group by all
order by run_id, checkpoint_step, train_example_id, observed_example_id, observed_response_type
