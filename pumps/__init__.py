"""Pump plugins: the contract (:mod:`pumps.base`), the registry and one module per sink."""
