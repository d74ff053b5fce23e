"""Automated retraining: feedback in, a policy fires, its run is gated, a better model promoted.

A policy names a feedback stream, a job spec template, a trigger and a promotion gate. The
scheduler's leader (service/scheduler.py, in the API) takes each policy one step further every
pass (`runs.tick`):

1. no run in flight: if the trigger holds (`triggers`), *fire*: snapshot the stream into a
   dataset, submit a job from the template, record the run;
2. a run in flight whose job has ended: *decide* (`gate`): apply the gate to the job's final
   metrics; a passing run becomes the policy's ``promoted`` model (and, if the template's
   output destination is the Hub or S3, its artifacts are published there); a failing run is
   kept with the reasons.

The held-out pairs. "Better than the promoted model" is only honest on the same pairs, scored
against the same reference. So every run of a policy is evaluated on one fixed eval dataset:
the template's ``eval_dataset_id`` if it names one, else a held-out set the policy draws at its
first firing (``holdout_fraction`` of the pairs gathered then, chosen with the template's seed)
and keeps for good. They are held out by prompt: no pair of a held-out prompt, then or later,
goes into training (a stream too concentrated on a few prompts is held out pair by pair, and
any later pair identical to one stays out). DPO's eval metrics (``eval_rewards/accuracies``,
``eval_loss``...) are relative to the reference model, which is the base model with the
adapter off; so two runs compare only when they share the eval dataset, the base model and
``beta``/``loss_type``. When they do not, the "not worse" check is skipped with a note and
the absolute thresholds alone decide.

Modules: `events` (parse a feedback batch, pure), `feedback` (streams in Redis),
`snapshots` (a stream's pairs frozen into a dataset), `triggers`, `gate` (pure decisions),
`policies` (records), `runs` (fire), `verdicts` (follow, judge, promote).
"""
