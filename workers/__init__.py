"""patchaudit compute: pure feature/coreset/k-NN/scoring/metrics modules plus thin Ray shells.

Nothing is imported here on purpose: importing `workers` must not pull in torch.
"""
