"""The registered model's code (MLflow "models from code"): it travels inside the model.

`mlflow.pyfunc.load_model("models:/<name>@champion").predict(paths)` takes
image file paths (a list, or a DataFrame whose one column, e.g. `image`,
holds them: the signature tasks/registry.py logs) and returns a DataFrame:
`class`, `probability`, one probability column per class, and, for a model
with a reference window, `ood_score` and `out_of_distribution`: each image's
distance from the target domain and whether it is beyond the threshold
calibrated on target val (xfer/drift/ood.py). MLflow checks
the input against the signature first; arrays in memory go to
`.unwrap_python_model().predict(None, arrays)`, which skips that check.
The preprocessing and every weight the model needs are in its `bundle`
artifact (xfer/predictor.py); the xfer package travels as its code path.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    def load_context(self, context):
        from xfer.predictor import load_bundle

        # The folder too: `xfer monitor` reads the reference window saved in it (xfer/monitor.py).
        self.bundle_dir = context.artifacts["bundle"]
        self.predictor = load_bundle(self.bundle_dir)
        self.ood = None
        from pathlib import Path

        from xfer.monitor import REFERENCE_DIR, read_reference

        if (Path(self.bundle_dir) / REFERENCE_DIR).is_dir():
            self.ood = read_reference(Path(self.bundle_dir)).ood

    # No type hints: the logged signature states the served input (paths); called
    # directly, paths, arrays and frames are all welcome (xfer.predictor.as_image_list).
    def predict(self, context, model_input, params=None):
        from xfer.predictor import DEFAULT_BATCH_SIZE, as_image_list

        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        images = as_image_list(model_input)
        if getattr(self, "ood", None) is None:
            return self.predictor.frame(self.predictor.predict_proba(images, batch_size))
        from xfer.monitor import with_ood_columns

        features, probabilities = self.predictor.predict_with_features(images, batch_size)
        return with_ood_columns(self.predictor.frame(probabilities), self.ood, features)


mlflow.models.set_model(ImageClassifier())
