"""Models: the SASRec backbone and FedDMMR (SASRec + memory experts)."""
