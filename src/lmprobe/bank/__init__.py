"""The probe bank: trains every probe of a run on the same batches of features."""
