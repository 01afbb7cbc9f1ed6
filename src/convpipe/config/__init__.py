"""params.yaml: its typed schema (``schema``) and the one way values are written into it (``edit``).

Every value convpipe uses comes from params.yaml through :func:`convpipe.config.schema.load_params`;
``convpipe recipe`` and ``tune --apply`` write into it through
:func:`convpipe.config.edit.write_values`.
"""
