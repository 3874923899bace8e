-- Influence matrix summarised by response type: how one update on a training example moves each
-- observed response type, on the same prompt and on other prompts, at each checkpoint and method.
-- One row per (run_id, checkpoint, checkpoint_step, method, train_response_type, observed_response_type, scope).
-- Columns:
--   run_id, checkpoint, checkpoint_step, method, train_response_type, observed_response_type
--   scope         'same_prompt' (observed_example_id = train_example_id) | 'other_prompt'
--   n             matrix entries averaged
--   mean_value    mean change of log pi(y_j|x_j) per update (nats)
--   mean_entk     mean eNTK entry d_i . g_j (null for naive methods)
--   share_positive  share of entries > 0
select
    run_id,
    checkpoint,
    checkpoint_step,
    method,
    train_response_type,
    observed_response_type,
    case when observed_example_id = train_example_id then 'same_prompt' else 'other_prompt' end as scope,
    count(*) as n,
    avg(value) as mean_value,
    avg(entk) as mean_entk,
    avg(case when value > 0 then 1.0 else 0.0 end) as share_positive
from influence
group by all
order by run_id, checkpoint_step, method, train_response_type, observed_response_type, scope
