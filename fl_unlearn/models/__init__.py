"""Models: the latent autoencoder, the class-conditional UNet, and (later) re-identification and classifier networks."""
