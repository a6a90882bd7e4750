"""The served model's definition, in MLflow's models-from-code form: MLflow stores this file with the model and
runs it at load time, so the registered model holds no pickled Python object (only ONNX files, JSON and code)."""

from mlflow.models import set_model

from lafs.serving.pyfunc import FaceModel

set_model(FaceModel())
