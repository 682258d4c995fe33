"""Core Lightning's ``hsm_secret`` file -> the node's private key.

Pure: everything here takes the file's bytes (and a passphrase) and does no
I/O. The four on-disk formats Core Lightning (v26.06) reads, told apart by
length exactly as it does (``common/hsm_secret.c``):

=================  =============================================================
file length        format
=================  =============================================================
< 32               not an ``hsm_secret`` (:class:`CorruptHsmSecret`)
32                 legacy plain: the 32 bytes are the secret
73                 legacy encrypted: libsodium secretstream (XChaCha20-Poly1305)
                   header (24) + ciphertext (49) of the 32-byte secret, keyed by
                   Argon2id(passphrase, salt ``c-lightning`` + NULs, MODERATE)
anything else      mnemonic: 32 bytes (zero, or SHA256 of the BIP39 seed when a
                   passphrase protects it), then the English BIP39 mnemonic; the
                   secret is the 64-byte BIP39 seed
=================  =============================================================

The node key is ``HKDF-SHA256(ikm=secret[0:32], salt=u32le(counter),
info=b"nodeid")`` with the counter starting at 0 and bumped until the result
is a valid secp256k1 key.

Errors: :class:`PassphraseRequired` (one is needed, none given),
:class:`WrongPassphrase` (the one given does not open it, or one was given for
a file that has none) and :class:`CorruptHsmSecret` (damaged or not a format
Core Lightning writes). Core Lightning checks the passphrase of a mnemonic file
before the mnemonic itself; here the mnemonic is checked first, so that a
damaged file is reported as damaged rather than as a wrong passphrase.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
import nacl.pwhash.argon2id
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cldcb.core.ids import SECP256K1_N
from cldcb.errors import CorruptHsmSecret, PassphraseRequired, WrongPassphrase

PLAIN_LEN = 32
ENCRYPTED_LEN = 73
PASSPHRASE_CHECK_LEN = 32
ENCRYPTION_SALT = b"c-lightning".ljust(16, b"\0")
ARGON2ID_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_MODERATE  # 3
ARGON2ID_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_MODERATE  # 256 MiB
_HEADER_LEN = nacl.bindings.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
BIP39_ROUNDS = 2048
BIP39_WORD_COUNTS = (12, 15, 18, 21, 24)


class HsmSecretFormat(enum.IntEnum):
    """The formats, numbered as Core Lightning's ``enum hsm_secret_type``."""

    PLAIN = 0
    ENCRYPTED = 1
    MNEMONIC_NO_PASS = 2
    MNEMONIC_WITH_PASS = 3


@dataclass(frozen=True)
class HsmSecret:
    """An opened ``hsm_secret``: its format and the secret data hsmd works from.

    ``secret_data`` is 32 bytes for the legacy formats and the 64-byte BIP39
    seed for the mnemonic formats. It is kept out of ``repr``.
    """

    format: HsmSecretFormat
    secret_data: bytes = field(repr=False)

    def node_key(self) -> bytes:
        """The node's 32-byte private key."""
        return node_key_from_secret(self.secret_data)


def detect_format(file_bytes: bytes) -> HsmSecretFormat:
    """Which format ``file_bytes`` is in, by length and first 32 bytes."""
    size = len(file_bytes)
    if size < PLAIN_LEN:
        raise CorruptHsmSecret(
            f"hsm_secret is {size} bytes long, shorter than any format Core Lightning "
            "writes (32 or more): the file is damaged or not an hsm_secret; use the "
            "node's own hsm_secret or a backup of it")
    if size == PLAIN_LEN:
        return HsmSecretFormat.PLAIN
    if size == ENCRYPTED_LEN:
        return HsmSecretFormat.ENCRYPTED
    if file_bytes[:PASSPHRASE_CHECK_LEN] == bytes(PASSPHRASE_CHECK_LEN):
        return HsmSecretFormat.MNEMONIC_NO_PASS
    return HsmSecretFormat.MNEMONIC_WITH_PASS


def needs_passphrase(file_bytes: bytes) -> bool:
    """True if opening ``file_bytes`` takes a passphrase.

    A damaged mnemonic file raises :class:`CorruptHsmSecret` here already, so
    that nobody is asked for a passphrase that could not help.
    """
    fmt = detect_format(file_bytes)
    if fmt in (HsmSecretFormat.MNEMONIC_NO_PASS, HsmSecretFormat.MNEMONIC_WITH_PASS):
        _mnemonic_words(file_bytes)
    return fmt in (HsmSecretFormat.ENCRYPTED, HsmSecretFormat.MNEMONIC_WITH_PASS)


def load_hsm_secret(file_bytes: bytes, passphrase: str | None = None) -> HsmSecret:
    """Open an ``hsm_secret`` in any of the four formats."""
    fmt = detect_format(file_bytes)
    if fmt is HsmSecretFormat.PLAIN:
        if passphrase is not None:
            raise WrongPassphrase(
                "this hsm_secret is not encrypted (legacy 32-byte format), yet a "
                "passphrase was given: run again without --passphrase-file")
        return HsmSecret(fmt, bytes(file_bytes))
    if fmt is HsmSecretFormat.ENCRYPTED:
        return HsmSecret(fmt, _decrypt_legacy(file_bytes, passphrase))
    return HsmSecret(fmt, _mnemonic_seed(file_bytes, fmt, passphrase))


def node_key(file_bytes: bytes, passphrase: str | None = None) -> bytes:
    """The node's 32-byte private key from the bytes of its ``hsm_secret``."""
    return load_hsm_secret(file_bytes, passphrase).node_key()


def node_key_from_secret(secret_data: bytes) -> bytes:
    """Core Lightning's node key: HKDF of ``secret_data[:32]`` with a counter salt."""
    if len(secret_data) < PLAIN_LEN:
        raise CorruptHsmSecret("hsm_secret data is shorter than 32 bytes")
    counter = 0
    while True:
        candidate = HKDF(algorithm=hashes.SHA256(), length=32,
                         salt=struct.pack("<I", counter),
                         info=b"nodeid").derive(secret_data[:PLAIN_LEN])
        if 0 < int.from_bytes(candidate, "big") < SECP256K1_N:
            return candidate
        counter += 1


def encryption_key(passphrase: str) -> bytes:
    """Argon2id key of the legacy encrypted format (about a second, 256 MiB)."""
    return nacl.pwhash.argon2id.kdf(32, passphrase.encode("utf-8"), ENCRYPTION_SALT,
                                    opslimit=ARGON2ID_OPSLIMIT,
                                    memlimit=ARGON2ID_MEMLIMIT)


def _decrypt_legacy(file_bytes: bytes, passphrase: str | None) -> bytes:
    if passphrase is None:
        raise PassphraseRequired(
            "this hsm_secret is encrypted (legacy 73-byte format) and no passphrase "
            "was given: give it with --passphrase-file, or type it when asked")
    key = encryption_key(passphrase)
    state = nacl.bindings.crypto_secretstream_xchacha20poly1305_state()
    try:
        nacl.bindings.crypto_secretstream_xchacha20poly1305_init_pull(
            state, bytes(file_bytes[:_HEADER_LEN]), key)
        secret, _tag = nacl.bindings.crypto_secretstream_xchacha20poly1305_pull(
            state, bytes(file_bytes[_HEADER_LEN:]), None)
    except nacl.exceptions.CryptoError:
        raise WrongPassphrase(
            "the passphrase does not decrypt this hsm_secret (legacy encrypted "
            "format): check it and try again (a damaged file fails the same way)"
        ) from None
    if len(secret) != PLAIN_LEN:
        raise CorruptHsmSecret("encrypted hsm_secret decrypted to an unexpected length: "
                               "the file is damaged; use a backup of it")
    return bytes(secret)


def _mnemonic_words(file_bytes: bytes) -> str:
    raw = bytes(file_bytes[PASSPHRASE_CHECK_LEN:])
    # Core Lightning copies the mnemonic with strndup: it ends at a NUL byte.
    raw = raw.split(b"\0", 1)[0]
    bad = next((i for i, byte in enumerate(raw) if not 0x20 <= byte < 0x7F), None)
    if bad is not None:
        raise CorruptHsmSecret(
            f"hsm_secret is {len(file_bytes)} bytes, so it should hold a BIP39 "
            "mnemonic in ASCII words after its first 32 bytes, but the byte at offset "
            f"{PASSPHRASE_CHECK_LEN + bad} is {raw[bad]:#04x}, not a letter or space: "
            "the file is damaged or not an hsm_secret; use a backup of it")
    mnemonic = raw.decode("ascii")
    problem = bip39_problem(mnemonic)
    if problem:
        raise CorruptHsmSecret(
            f"hsm_secret holds no valid BIP39 mnemonic ({problem}): the file is "
            "damaged or not an hsm_secret; use a backup of it")
    return mnemonic


def _mnemonic_seed(file_bytes: bytes, fmt: HsmSecretFormat,
                   passphrase: str | None) -> bytes:
    mnemonic = _mnemonic_words(file_bytes)
    if fmt is HsmSecretFormat.MNEMONIC_NO_PASS:
        if passphrase is not None:
            # Core Lightning refuses this too ("Passphrase provided but not needed").
            raise WrongPassphrase(
                "this hsm_secret (mnemonic format) has no passphrase, yet one was "
                "given: run again without --passphrase-file")
        return bip39_seed(mnemonic, "")
    if passphrase is None:
        raise PassphraseRequired(
            "this hsm_secret (mnemonic format) is protected by a passphrase and none "
            "was given: give it with --passphrase-file, or type it when asked")
    seed = bip39_seed(mnemonic, passphrase)
    if hashlib.sha256(seed).digest() != bytes(file_bytes[:PASSPHRASE_CHECK_LEN]):
        raise WrongPassphrase(
            "the passphrase does not match this hsm_secret (mnemonic format): "
            "check it and try again")
    return seed


def bip39_seed(mnemonic: str, passphrase: str) -> bytes:
    """The 64-byte BIP39 seed (PBKDF2-HMAC-SHA512, 2048 rounds)."""
    return hashlib.pbkdf2_hmac("sha512", mnemonic.encode("utf-8"),
                               b"mnemonic" + passphrase.encode("utf-8"), BIP39_ROUNDS)


def bip39_problem(mnemonic: str) -> str:
    """'' if ``mnemonic`` is a valid English BIP39 mnemonic, else what is wrong.

    Valid means what libwally's ``bip39_mnemonic_validate`` (used by Core
    Lightning) accepts: words of the English list separated by single spaces,
    a word count of 12, 15, 18, 21 or 24, and a matching checksum.
    """
    words = mnemonic.split(" ")
    if len(words) not in BIP39_WORD_COUNTS:
        count = f"{len(words)} word" + ("s" if len(words) != 1 else "")
        return f"{count}, expected 12, 15, 18, 21 or 24 separated by single spaces"
    index = _word_index()
    value = 0
    for pos, word in enumerate(words):
        number = index.get(word)
        if number is None:
            return f"word {pos + 1} is not in the English BIP39 word list"
        value = (value << 11) | number
    nbits = 11 * len(words)
    checksum_bits = nbits // 33
    entropy = (value >> checksum_bits).to_bytes((nbits - checksum_bits) // 8, "big")
    checksum = value & ((1 << checksum_bits) - 1)
    expected = hashlib.sha256(entropy).digest()[0] >> (8 - checksum_bits)
    if checksum != expected:
        return "its checksum does not match"
    return ""


def bip39_words() -> list[str]:
    """The 2048 words of the English BIP39 list, in order."""
    return _BIP39_ENGLISH.split()


_WORD_INDEX: dict[str, int] = {}


def _word_index() -> dict[str, int]:
    if not _WORD_INDEX:
        _WORD_INDEX.update((word, i) for i, word in enumerate(bip39_words()))
    return _WORD_INDEX


# The English BIP39 word list (BIP-0039 english.txt; its SHA256 is checked by
# the tests).
_BIP39_ENGLISH = """
abandon ability able about above absent absorb abstract absurd abuse access accident account
accuse achieve acid acoustic acquire across act action actor actress actual adapt add addict
address adjust admit adult advance advice aerobic affair afford afraid again age agent agree
ahead aim air airport aisle alarm album alcohol alert alien all alley allow almost alone
alpha already also alter always amateur amazing among amount amused analyst anchor ancient
anger angle angry animal ankle announce annual another answer antenna antique anxiety any
apart apology appear apple approve april arch arctic area arena argue arm armed armor army
around arrange arrest arrive arrow art artefact artist artwork ask aspect assault asset
assist assume asthma athlete atom attack attend attitude attract auction audit august aunt
author auto autumn average avocado avoid awake aware away awesome awful awkward axis baby
bachelor bacon badge bag balance balcony ball bamboo banana banner bar barely bargain barrel
base basic basket battle beach bean beauty because become beef before begin behave behind
believe below belt bench benefit best betray better between beyond bicycle bid bike bind
biology bird birth bitter black blade blame blanket blast bleak bless blind blood blossom
blouse blue blur blush board boat body boil bomb bone bonus book boost border boring borrow
boss bottom bounce box boy bracket brain brand brass brave bread breeze brick bridge brief
bright bring brisk broccoli broken bronze broom brother brown brush bubble buddy budget
buffalo build bulb bulk bullet bundle bunker burden burger burst bus business busy butter
buyer buzz cabbage cabin cable cactus cage cake call calm camera camp can canal cancel candy
cannon canoe canvas canyon capable capital captain car carbon card cargo carpet carry cart
case cash casino castle casual cat catalog catch category cattle caught cause caution cave
ceiling celery cement census century cereal certain chair chalk champion change chaos
chapter charge chase chat cheap check cheese chef cherry chest chicken chief child chimney
choice choose chronic chuckle chunk churn cigar cinnamon circle citizen city civil claim
clap clarify claw clay clean clerk clever click client cliff climb clinic clip clock clog
close cloth cloud clown club clump cluster clutch coach coast coconut code coffee coil coin
collect color column combine come comfort comic common company concert conduct confirm
congress connect consider control convince cook cool copper copy coral core corn correct
cost cotton couch country couple course cousin cover coyote crack cradle craft cram crane
crash crater crawl crazy cream credit creek crew cricket crime crisp critic crop cross
crouch crowd crucial cruel cruise crumble crunch crush cry crystal cube culture cup cupboard
curious current curtain curve cushion custom cute cycle dad damage damp dance danger daring
dash daughter dawn day deal debate debris decade december decide decline decorate decrease
deer defense define defy degree delay deliver demand demise denial dentist deny depart
depend deposit depth deputy derive describe desert design desk despair destroy detail detect
develop device devote diagram dial diamond diary dice diesel diet differ digital dignity
dilemma dinner dinosaur direct dirt disagree discover disease dish dismiss disorder display
distance divert divide divorce dizzy doctor document dog doll dolphin domain donate donkey
donor door dose double dove draft dragon drama drastic draw dream dress drift drill drink
drip drive drop drum dry duck dumb dune during dust dutch duty dwarf dynamic eager eagle
early earn earth easily east easy echo ecology economy edge edit educate effort egg eight
either elbow elder electric elegant element elephant elevator elite else embark embody
embrace emerge emotion employ empower empty enable enact end endless endorse enemy energy
enforce engage engine enhance enjoy enlist enough enrich enroll ensure enter entire entry
envelope episode equal equip era erase erode erosion error erupt escape essay essence estate
eternal ethics evidence evil evoke evolve exact example excess exchange excite exclude
excuse execute exercise exhaust exhibit exile exist exit exotic expand expect expire explain
expose express extend extra eye eyebrow fabric face faculty fade faint faith fall false fame
family famous fan fancy fantasy farm fashion fat fatal father fatigue fault favorite feature
february federal fee feed feel female fence festival fetch fever few fiber fiction field
figure file film filter final find fine finger finish fire firm first fiscal fish fit
fitness fix flag flame flash flat flavor flee flight flip float flock floor flower fluid
flush fly foam focus fog foil fold follow food foot force forest forget fork fortune forum
forward fossil foster found fox fragile frame frequent fresh friend fringe frog front frost
frown frozen fruit fuel fun funny furnace fury future gadget gain galaxy gallery game gap
garage garbage garden garlic garment gas gasp gate gather gauge gaze general genius genre
gentle genuine gesture ghost giant gift giggle ginger giraffe girl give glad glance glare
glass glide glimpse globe gloom glory glove glow glue goat goddess gold good goose gorilla
gospel gossip govern gown grab grace grain grant grape grass gravity great green grid grief
grit grocery group grow grunt guard guess guide guilt guitar gun gym habit hair half hammer
hamster hand happy harbor hard harsh harvest hat have hawk hazard head health heart heavy
hedgehog height hello helmet help hen hero hidden high hill hint hip hire history hobby
hockey hold hole holiday hollow home honey hood hope horn horror horse hospital host hotel
hour hover hub huge human humble humor hundred hungry hunt hurdle hurry hurt husband hybrid
ice icon idea identify idle ignore ill illegal illness image imitate immense immune impact
impose improve impulse inch include income increase index indicate indoor industry infant
inflict inform inhale inherit initial inject injury inmate inner innocent input inquiry
insane insect inside inspire install intact interest into invest invite involve iron island
isolate issue item ivory jacket jaguar jar jazz jealous jeans jelly jewel job join joke
journey joy judge juice jump jungle junior junk just kangaroo keen keep ketchup key kick kid
kidney kind kingdom kiss kit kitchen kite kitten kiwi knee knife knock know lab label labor
ladder lady lake lamp language laptop large later latin laugh laundry lava law lawn lawsuit
layer lazy leader leaf learn leave lecture left leg legal legend leisure lemon lend length
lens leopard lesson letter level liar liberty library license life lift light like limb
limit link lion liquid list little live lizard load loan lobster local lock logic lonely
long loop lottery loud lounge love loyal lucky luggage lumber lunar lunch luxury lyrics
machine mad magic magnet maid mail main major make mammal man manage mandate mango mansion
manual maple marble march margin marine market marriage mask mass master match material math
matrix matter maximum maze meadow mean measure meat mechanic medal media melody melt member
memory mention menu mercy merge merit merry mesh message metal method middle midnight milk
million mimic mind minimum minor minute miracle mirror misery miss mistake mix mixed mixture
mobile model modify mom moment monitor monkey monster month moon moral more morning mosquito
mother motion motor mountain mouse move movie much muffin mule multiply muscle museum
mushroom music must mutual myself mystery myth naive name napkin narrow nasty nation nature
near neck need negative neglect neither nephew nerve nest net network neutral never news
next nice night noble noise nominee noodle normal north nose notable note nothing notice
novel now nuclear number nurse nut oak obey object oblige obscure observe obtain obvious
occur ocean october odor off offer office often oil okay old olive olympic omit once one
onion online only open opera opinion oppose option orange orbit orchard order ordinary organ
orient original orphan ostrich other outdoor outer output outside oval oven over own owner
oxygen oyster ozone pact paddle page pair palace palm panda panel panic panther paper parade
parent park parrot party pass patch path patient patrol pattern pause pave payment peace
peanut pear peasant pelican pen penalty pencil people pepper perfect permit person pet phone
photo phrase physical piano picnic picture piece pig pigeon pill pilot pink pioneer pipe
pistol pitch pizza place planet plastic plate play please pledge pluck plug plunge poem poet
point polar pole police pond pony pool popular portion position possible post potato pottery
poverty powder power practice praise predict prefer prepare present pretty prevent price
pride primary print priority prison private prize problem process produce profit program
project promote proof property prosper protect proud provide public pudding pull pulp pulse
pumpkin punch pupil puppy purchase purity purpose purse push put puzzle pyramid quality
quantum quarter question quick quit quiz quote rabbit raccoon race rack radar radio rail
rain raise rally ramp ranch random range rapid rare rate rather raven raw razor ready real
reason rebel rebuild recall receive recipe record recycle reduce reflect reform refuse
region regret regular reject relax release relief rely remain remember remind remove render
renew rent reopen repair repeat replace report require rescue resemble resist resource
response result retire retreat return reunion reveal review reward rhythm rib ribbon rice
rich ride ridge rifle right rigid ring riot ripple risk ritual rival river road roast robot
robust rocket romance roof rookie room rose rotate rough round route royal rubber rude rug
rule run runway rural sad saddle sadness safe sail salad salmon salon salt salute same
sample sand satisfy satoshi sauce sausage save say scale scan scare scatter scene scheme
school science scissors scorpion scout scrap screen script scrub sea search season seat
second secret section security seed seek segment select sell seminar senior sense sentence
series service session settle setup seven shadow shaft shallow share shed shell sheriff
shield shift shine ship shiver shock shoe shoot shop short shoulder shove shrimp shrug
shuffle shy sibling sick side siege sight sign silent silk silly silver similar simple since
sing siren sister situate six size skate sketch ski skill skin skirt skull slab slam sleep
slender slice slide slight slim slogan slot slow slush small smart smile smoke smooth snack
snake snap sniff snow soap soccer social sock soda soft solar soldier solid solution solve
someone song soon sorry sort soul sound soup source south space spare spatial spawn speak
special speed spell spend sphere spice spider spike spin spirit split spoil sponsor spoon
sport spot spray spread spring spy square squeeze squirrel stable stadium staff stage stairs
stamp stand start state stay steak steel stem step stereo stick still sting stock stomach
stone stool story stove strategy street strike strong struggle student stuff stumble style
subject submit subway success such sudden suffer sugar suggest suit summer sun sunny sunset
super supply supreme sure surface surge surprise surround survey suspect sustain swallow
swamp swap swarm swear sweet swift swim swing switch sword symbol symptom syrup system table
tackle tag tail talent talk tank tape target task taste tattoo taxi teach team tell ten
tenant tennis tent term test text thank that theme then theory there they thing this thought
three thrive throw thumb thunder ticket tide tiger tilt timber time tiny tip tired tissue
title toast tobacco today toddler toe together toilet token tomato tomorrow tone tongue
tonight tool tooth top topic topple torch tornado tortoise toss total tourist toward tower
town toy track trade traffic tragic train transfer trap trash travel tray treat tree trend
trial tribe trick trigger trim trip trophy trouble truck true truly trumpet trust truth try
tube tuition tumble tuna tunnel turkey turn turtle twelve twenty twice twin twist two type
typical ugly umbrella unable unaware uncle uncover under undo unfair unfold unhappy uniform
unique unit universe unknown unlock until unusual unveil update upgrade uphold upon upper
upset urban urge usage use used useful useless usual utility vacant vacuum vague valid
valley valve van vanish vapor various vast vault vehicle velvet vendor venture venue verb
verify version very vessel veteran viable vibrant vicious victory video view village vintage
violin virtual virus visa visit visual vital vivid vocal voice void volcano volume vote
voyage wage wagon wait walk wall walnut want warfare warm warrior wash wasp waste water wave
way wealth weapon wear weasel weather web wedding weekend weird welcome west wet whale what
wheat wheel when where whip whisper wide width wife wild will win window wine wing wink
winner winter wire wisdom wise wish witness wolf woman wonder wood wool word work world
worry worth wrap wreck wrestle wrist write wrong yard year yellow you young youth zebra zero
zone zoo
"""
