"""Studies: a claim of a paper measured end to end on the embedded model, cached and resumable (`moh-study`)."""
