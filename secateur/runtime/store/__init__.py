"""Models and data in and out: loading, saving, streaming weights, formats, fingerprints, output folders."""
