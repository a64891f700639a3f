"""`fob batch`: a cohort of `fob segment` jobs from a CSV manifest, on Dask (see docs/BATCH.md).

manifest.py reads and checks the manifest; rows.py is what one row does on a worker; run.py
drives the cohort (cluster, progress, Ctrl-C) and writes the HTML report (reports/html.py).
"""
