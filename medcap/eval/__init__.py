"""Evaluation exactly as ImageCLEFmedical does it.

``metrics`` (preprocessing and every caption metric), ``bertscore`` (BERTScore equal to the official
one-pair-at-a-time computation, batched), ``evaluate`` (scores with bootstrap intervals), ``compare``
(paired bootstrap of two runs), ``submission`` (writing and checking submission files), ``report``
(the self-contained HTML report).
"""
