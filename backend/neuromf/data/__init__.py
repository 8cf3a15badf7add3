"""Data: phantoms, the brain and lesion geometry on the model grid, mask representations, the latent cache and
the FCD data set."""
