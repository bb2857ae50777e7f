"""A fixed set of sentences (written for this project) on which a pretrained encoder's embeddings are
compared before and after its attention is swapped (experiments/swap_attention.py): short and long,
plain and technical, so that windowed and block-sparse mechanisms have distant tokens to lose."""

__all__ = ["PROBE_SENTENCES"]

PROBE_SENTENCES = (
    "The ferry left the harbour an hour late because of the fog.",
    "Bake the bread at a high temperature for the first ten minutes, then lower the heat.",
    "Our neighbours adopted a grey cat that sleeps on the warm roof of their car.",
    "The river flooded the lower fields twice this winter.",
    "A linear recurrence keeps a fixed-size state, so decoding costs the same at every step.",
    "He forgot his umbrella on the train, and by the time he reached the office he was soaked.",
    "The museum's new wing displays maps drawn by sailors in the sixteenth century.",
    "Children in the village learn to swim in the lake before they learn to ride bicycles.",
    "The quarterly report shows that sales rose in the north while costs fell everywhere.",
    "Quantizing queries and keys to eight bits keeps most of the accuracy of attention.",
    "When the old lighthouse keeper retired, the town replaced him with an automatic lamp that "
    "flashes every ten seconds, and the visitors who used to climb the tower to talk with him now "
    "photograph the door instead.",
    "Mix the flour, the sugar and the butter until the dough holds together, wrap it, and let it rest "
    "in a cold place for at least an hour before you roll it out on a floured table.",
    "The orchestra rehearsed the symphony for three weeks, yet on the night of the concert the "
    "conductor changed the tempo of the second movement and the violins struggled to follow.",
    "Block-sparse attention splits the keys into blocks, scores each block by its mean key, and lets "
    "every query attend only to the few blocks with the highest scores and to its own block.",
    "After the storm the hikers waited in the hut for two days, sharing the last of their bread and "
    "listening to the wind, until a helicopter could land on the ridge and carry them down.",
    "The library closes early on Sundays.",
)
