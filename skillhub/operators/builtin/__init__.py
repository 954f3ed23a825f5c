"""The built-in operators: ``raw``, ``rtn``, ``magnitude-prune``, ``svd``, ``lowrank`` and
``svd-mixed``, registered as ``skillhub.operators`` entry points in skillhub's pyproject."""
