"""The method families: each module registers its methods with the engine's registry."""
