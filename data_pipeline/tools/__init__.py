"""The data side's measuring tools: the loader benchmark and the conversion benchmark."""
