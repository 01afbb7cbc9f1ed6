"""Running a trained model: one path for evaluate, predict, export, feature maps, serving.

- :mod:`~convpipe.inference.trained`: a checkpoint with the prepared data it must match (one
  check of geometry, normalisation and classes), on the device inference runs on;
- :mod:`~convpipe.inference.predict`: logits of a prepared split, top-k classes of uint8
  images and of image files, in :data:`~convpipe.data.datamodule.EVAL_BATCH_SIZE` images a
  forward pass, through the params' test-time augmentation.
"""
