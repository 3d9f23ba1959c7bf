"""Small tokenizers made locally for the `tiny` model types (and `random` mode).

Real checkpoints ship their own tokenizer; tiny models need one without any
download. Each family gets a byte-level BPE learnt from the fixed English text
below (byte-level, so every string round-trips and nothing maps to <unk>),
with the special tokens laid out like the real tokenizer of that family:

* opt:   <s>=0 <pad>=1 </s>=2 <unk>=3, bos = eos = </s> (as OPT's tokenizer)
* t5:    <pad>=0 </s>=1 <unk>=2, no bos, </s> appended to inputs
* llama: <unk>=0 <s>=1 </s>=2, [PAD] added after the vocabulary, bos = eos = </s> (as InstructBLIP
  Vicuna's tokenizer in LAVIS and in the official folders)
* qformer (BERT-like, lower-cased): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, [DEC] added as bos
  (as InstructBLIP's)

The LLM tokenizers also carry the `<image>` placeholder as an added special
token: transformers' BLIP-2 writes the Q-Former outputs over the positions of
that token id. Training is deterministic, so the same ids come out in every
process (data workers, ranks, tools); the learnt tokenizer is kept in memory
per process only.
"""
from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"

# Ordinary English about everyday scenes, people, objects, colours, shapes and
# reasoning, plus the instruction words recipes use ("question", "inference").
_CORPUS = """
a photo of a man riding a red bike down the street next to a parked car.
a woman is holding an umbrella because it is raining outside.
two dogs are playing with a ball in the green grass of the park.
the cat is sleeping on the couch in the living room near the window.
a group of people are standing at the bus stop waiting for the bus to come.
the kitchen table has plates, cups, a bowl of fruit and a knife on it.
a young boy is eating a slice of pizza while sitting on a wooden chair.
there is a large blue circle, a small yellow square and a tall green triangle.
the red square is on the left and the white circle is on the right side.
a black star sits above an orange rectangle near the bottom of the picture.
the purple shape in the highlighted region is bigger than the other shapes.
inference: the person is probably going to work because he wears a suit.
clue: the ground is wet. inference: it rained a short time ago.
clue: the people wear coats and hats. inference: it is cold outside today.
question: what is the man doing? answer: he is cooking dinner for his family.
question: how many birds are in the sky? answer: there are three birds.
describe the image in detail. write a short description of this picture.
what can you infer from the highlighted region of the image?
the sun is setting over the ocean and the sky is pink and orange.
a train is coming into the station while a crowd waits on the platform.
the children are laughing at the clown at the birthday party.
she looks tired after a long day, so she will go to bed early tonight.
an old house with a broken door stands at the end of a quiet road.
the food on the counter suggests that someone was making breakfast.
a player kicks the soccer ball toward the goal during the game.
the store is closed because the lights are off and the sign says closed.
he is carrying a heavy box up the stairs of the building.
they are sitting around a fire at night, telling stories and drinking tea.
the little girl holds her mother's hand as they cross the busy street.
a man in a white shirt and blue jeans is reading a book on a bench.
one, two, three, four, five, six, seven, eight, nine, ten, 2024, 100%.
is it likely? yes, it is very likely. no, it is not likely at all!
this is a photograph of an elephant, a giraffe and a zebra at the zoo.
the doctor is talking with a patient in the hospital room.
snow covers the mountains, trees and the roofs of the small town.
a plane flies high above the clouds on a bright sunny morning.
"""


def _train_bpe(special_tokens: list[str], vocab_size: int, lowercase: bool, prefix_space: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    # add_prefix_space mimics sentencepiece tokenizers (T5, LLaMA): "dog" and
    # " dog" give the same tokens, as they do for the real checkpoints.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    return tok


@functools.lru_cache(maxsize=None)
def _tokenizer_json(kind: str) -> str:
    """Learn the tokenizer of `kind` once per process; returns its JSON."""
    if kind == "opt":
        tok = _train_bpe(["<s>", "<pad>", "</s>", "<unk>"], 640, lowercase=False, prefix_space=False)
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", 2)])
        tok.add_special_tokens([IMAGE_TOKEN])
    elif kind == "t5":
        tok = _train_bpe(["<pad>", "</s>", "<unk>"], 640, lowercase=False, prefix_space=True)
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 1)])
        tok.add_special_tokens([IMAGE_TOKEN])
    elif kind == "llama":
        tok = _train_bpe(["<unk>", "<s>", "</s>"], 640, lowercase=False, prefix_space=True)
        # InstructBLIP Vicuna starts text with </s> (LAVIS sets bos_token to </s>, and so does the official
        # tokenizer) and pads with an added [PAD].
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                           special_tokens=[("</s>", 2)])
        tok.add_special_tokens(["[PAD]", IMAGE_TOKEN])
    elif kind == "qformer":
        tok = _train_bpe(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], 512, lowercase=True, prefix_space=True)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        # InstructBLIP's Q-Former tokenizer adds [DEC] as its bos (LAVIS init_tokenizer; the official
        # qformer_tokenizer has it too: 30522 + 1 ids).
        tok.add_special_tokens(["[DEC]"])
    else:
        raise ValueError(f"no local tokenizer for '{kind}'; choose opt, t5, llama or qformer")
    return tok.to_str()


_SPECIALS = {
    "opt": dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
    "t5": dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>"),
    "llama": dict(bos_token="</s>", eos_token="</s>", pad_token="[PAD]", unk_token="<unk>"),
    "qformer": dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
                    bos_token="[DEC]"),
}


def local_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer for `kind` in {"opt", "t5", "llama", "qformer"} (takes milliseconds)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(kind)), **_SPECIALS[kind])
    if kind != "qformer":
        # Blip2Processor reads `tokenizer.image_token`; keep the same attribute.
        tok.image_token = IMAGE_TOKEN
    return tok
