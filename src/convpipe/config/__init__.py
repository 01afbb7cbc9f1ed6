"""params.yaml: its typed schema (``schema``) and recipe overlays applied to it (``recipes``).

Every value convpipe uses comes from params.yaml through :func:`convpipe.config.schema.load_params`;
``tune --apply`` writes into it through :mod:`convpipe.tuning.apply`.
"""
