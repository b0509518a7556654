"""MLflow models-from-code entry: the logged model is this file plus the loramoe package,
not a pickled object."""

import mlflow

from loramoe.serving.pyfunc import AnswerModel

mlflow.models.set_model(AnswerModel())
