"""Evaluation: the mask test (P7-T1), lesion-likeness, generation metrics, the segmenter check, the verification
report and its checks."""
