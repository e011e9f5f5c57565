"""The registered model's code (MLflow "models from code"): it travels inside the model.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)` takes
file paths, HxWxC arrays, or a DataFrame with an `image` column, and returns
a DataFrame: `class`, `probability`, and one probability column per class.
The preprocessing and every weight the model needs are in its `bundle`
artifact (xfer/predictor.py); the xfer package travels as its code path.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    def load_context(self, context):
        from xfer.predictor import load_bundle

        self.predictor = load_bundle(context.artifacts["bundle"])

    # No type hints: MLflow would then coerce inputs to one schema, and paths, arrays
    # and frames are all welcome here (xfer.predictor.as_image_list checks them).
    def predict(self, context, model_input, params=None):
        from xfer.predictor import as_image_list

        batch_size = int((params or {}).get("batch_size", 64))
        return self.predictor.frame(self.predictor.predict_proba(as_image_list(model_input), batch_size))


mlflow.models.set_model(ImageClassifier())
