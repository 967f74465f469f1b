"""The DreamBooth evaluation prompts (Ruiz et al. 2023, appendix; the dataset's prompts_and_classes.txt).

25 prompts for objects and 25 for live subjects (animals, people); `{}` stands for the subject, e.g.
"sks dog". The paper draws 4 images per prompt and subject and averages DINO / CLIP-I / CLIP-T over them.
The first ten and the last five prompts are shared; the middle ten differ: backgrounds and materials for
objects, outfits and accessories for live subjects.
"""
from ..errors import UserError

_SHARED_HEAD = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_SHARED_TAIL = (
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
OBJECT_PROMPTS = _SHARED_HEAD + (
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
) + _SHARED_TAIL
LIVE_PROMPTS = _SHARED_HEAD + (
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
) + _SHARED_TAIL

# Nouns that get the live-subject set (outfits and hats make sense for them). Anything else is an object,
# as in the paper, where only the dogs and cats of its 30 subjects are live.
LIVE_NOUNS = frozenset("""
    dog puppy cat kitten pet animal person people girl boy man woman child kid baby toddler lady guy
    teenager teen human face portrait selfie character bird parrot horse pony rabbit bunny hamster
    ferret fox wolf bear lion tiger monkey cow sheep goat pig duck chicken owl""".split())
# Words that make a live noun an object again: the paper's "stuffed animal" and toys are objects.
OBJECT_WORDS = frozenset("stuffed toy plush plushie figurine statue sculpture robot doll".split())


def is_live(class_noun):
    """True for animals and people ("dog", "golden retriever", "young woman"): the last word decides,
    unless a word such as "stuffed" or "toy" makes it an object ("stuffed animal", "toy dog")."""
    words = class_noun.lower().replace("-", " ").split()
    if not words or OBJECT_WORDS & set(words):
        return False
    return words[-1] in LIVE_NOUNS or words[-1].rstrip("s") in LIVE_NOUNS


def prompts_for(class_noun, token="sks"):
    """The 25 evaluation prompts for a subject of class `class_noun`, with "{token} {class_noun}" filled in."""
    class_noun = " ".join(class_noun.split())
    if not class_noun:
        raise UserError("the class noun is empty: give what the subject is, e.g. --class-noun dog")
    subject = f"{token} {class_noun}" if token else class_noun
    return [p.format(subject) for p in (LIVE_PROMPTS if is_live(class_noun) else OBJECT_PROMPTS)]
