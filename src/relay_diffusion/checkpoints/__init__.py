"""Networks on disk: safetensors snapshots with their JSON config (``snapshot``), reference ``.pkl`` / ``.pt``
checkpoints imported without executing them (``reference``, ``unpickle``), one loader for both (``loading``)
and the bundled tiny models (``bundled``)."""
