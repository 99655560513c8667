"""A miniature klein world with known ground truth: procedural scenes (world), an analytic reader of
generated images (reader), ground-truth metrics (scoring) and the pretrained micro models (models)."""
