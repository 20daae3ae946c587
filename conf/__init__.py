"""The Hydra configs, installed as the package ``mmel.conf`` (found at ``pkg://mmel.conf``); only YAML lives here."""
