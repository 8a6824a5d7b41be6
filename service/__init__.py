"""bertserve service: serves the variants that build_models publishes into the model store."""
