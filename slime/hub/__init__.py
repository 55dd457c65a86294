"""Where model checkpoints come from: a local Hugging Face folder, or a built-in name provisioned once into the
user cache (slime.hub.provision)."""
