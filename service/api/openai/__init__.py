"""The OpenAI-compatible routes: `/v1/files` and `/v1/fine_tuning/jobs`, in OpenAI's shapes
and error envelope, over the same store, tenants, datasets and jobs as our own routes."""

from service.api.openai.files import FileController
from service.api.openai.jobs import FineTuningController

__all__ = ["FileController", "FineTuningController"]
