"""Figures a reader checks at a glance, drawn with matplotlib (imported lazily, Agg backend):
montage.py (one propagation's slices), html.py (a batch's report page), plots.py (evaluation plots).
"""
