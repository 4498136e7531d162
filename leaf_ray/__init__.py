"""leaf-ray: LEAF distillation of text-embedding models on Ray."""
