"""The bundled demo: a procedural world of captioned clips (`world`) and the frame analysis that reads the
world's attributes back off frames (`analysis`)."""
