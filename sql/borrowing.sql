-- Hallucination "borrowing" over training: does log pi of OTHER prompts' answers (y_j!=u, irr_train) rise with
-- y+ during SFT? Controls: a held-out answer (irr_test) and an irrelevant human-like sentence (irr_hum).
-- Generation-based borrowing per checkpoint is in the table generation_borrowing.
-- One row per (run_id, phase, step). Columns:
--   run_id, phase, step, epoch
--   n_examples       probe prompts with an irr_train response
--   delta_chosen     mean change of log pi(y+|x_u) since the run's first evaluation (nats)
--   delta_irr_train  mean change of log pi(y_j!=u | x_u): another train prompt's chosen answer
--   delta_irr_test   mean change of log pi(y_test | x_u): a held-out prompt's chosen answer (null if not probed)
--   delta_irr_hum    mean change of log pi(y_hum | x_u) (null if not probed)
--   borrow_minus_test  delta_irr_train - delta_irr_test: the part specific to trained answers
select
    run_id,
    phase,
    step,
    any_value(epoch) as epoch,
    count(distinct example_id) filter (where response_type = 'irr_train') as n_examples,
    avg(delta) filter (where response_type = 'chosen') as delta_chosen,
    avg(delta) filter (where response_type = 'irr_train') as delta_irr_train,
    avg(delta) filter (where response_type = 'irr_test') as delta_irr_test,
    avg(delta) filter (where response_type = 'irr_hum') as delta_irr_hum,
    avg(delta) filter (where response_type = 'irr_train') - avg(delta) filter (where response_type = 'irr_test')
        as borrow_minus_test
from (
    select run_id, phase, step, epoch, example_id, response_type,
        logp_sum - first_value(logp_sum) over (
            partition by run_id, example_id, response_type order by step) as delta
    from trajectories
    where response_type in ('chosen', 'irr_train', 'irr_test', 'irr_hum')
)
group by run_id, phase, step
order by run_id, step
