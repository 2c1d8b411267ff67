"""Tools beside the federated core: baselines (centralized, local-only), run comparison, dataset checks."""
