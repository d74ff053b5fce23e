"""The OpenAI-compatible fine-tuning API's domain: OpenAI's objects to and from our records.

Teams whose pipelines call the official `openai` SDK (`client.files.create`,
`client.fine_tuning.jobs.create(method={"type": "dpo", ...})`) point it at us and change
nothing else. Nothing here is a second system: a file is one of our datasets, a fine-tuning
job is one of our jobs (created through the same `submit_job` as `POST /v1/jobs`), events are
the job's event stream, checkpoints are the worker's checkpoints in the blob store.

The seams: `hyperparameters` (OpenAI's values and "auto" to ours), `jobs` (create body to
JobSpec, Job to `fine_tuning.job`), `files` (datasets, failed uploads and result files as
file objects), `events` (stream entries and checkpoints as OpenAI objects), `records` (the
little kept beside our records: failed uploads, suffixes). All but `records` are pure.
"""
