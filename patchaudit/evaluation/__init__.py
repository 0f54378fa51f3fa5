"""Evaluation on labelled data: image and pixel AUROC, AUPRO, F1 at the calibrated threshold.

Off the scoring path: nothing that scores a run imports this package.
"""
