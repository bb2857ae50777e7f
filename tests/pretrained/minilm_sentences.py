"""Sentences of our own for the pretrained-encoder tests (and the reference recorded from them)."""

SENTENCES = (
    "The tide came in slowly over the flat grey sand.",
    "A kettle whistled in the kitchen while the rain kept falling.",
    "Sparse attention reads only a few blocks of keys for each query.",
    "She parked the bicycle beside the old stone bridge!",
    "Prime numbers greater than two are odd.",
    "The committee postponed its decision until next spring, citing the unfinished budget review "
    "and the missing reports from three regional offices.",
)
