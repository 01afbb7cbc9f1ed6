"""What tests share besides fixtures (those are in ``tests/conftest.py``).

- ``factories``: a params file in a folder, prepared data, a tiny trained checkpoint;
- ``models``: tiny networks (``TINY_CONV``, ``TINY_RESIDUAL``), the classifier builder,
  loaders and quiet Trainers;
- ``datagen``: real-format datasets and deliberately broken files;
- ``project``: a throwaway copy of the project in git + DVC, driven by the real CLIs;
- ``servers``: free ports, a real ``mlflow server``; ``pg``: a real PostgreSQL server;
- ``disk``: a small real disk for full-disk tests; ``cli``: ``convpipe`` in-process.
"""
