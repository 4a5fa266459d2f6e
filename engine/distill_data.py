"""Instructions for self-distillation: what the target is asked, so that its answers become training data.

Terms:
- *instruction*: a chat conversation (a tuple of {"role", "content"} dicts ending with a user
  message) plus a category. All were written for this project: templates x topics x styles,
  expanded and shuffled deterministically from a seed (`make_instructions`).
- *derived instruction*: built on an answer the target already gave (`derive_instructions`):
  summarise or rewrite that answer, or ask a follow-up question about it in a multi-turn chat.
- *held-out text*: every message of `engine/prompts/heldout.jsonl`. No instruction may contain any
  of it (`check_disjoint` asserts that no 8-word run is shared), so evaluations on that set stay honest.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

Messages = tuple[dict[str, str], ...]
_SHINGLE = 8  # words in a run that must not be shared with the held-out prompts


class HeldoutOverlap(AssertionError):
    """A training instruction shares text with engine/prompts/heldout.jsonl."""


@dataclass(frozen=True)
class Instruction:
    messages: Messages
    category: str


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(";") if part.strip()]


TOPICS = _items("""
volcanoes; earthquakes; ocean tides; the water cycle; photosynthesis; black holes; the Moon landing; the Roman Empire;
the printing press; the Industrial Revolution; ancient Egypt; the Silk Road; the Renaissance; the Cold War;
climate change; renewable energy; solar panels; wind turbines; electric cars; recycling; coral reefs; rainforests;
honey production; migrating birds; octopuses; dolphins; wolves; elephants; penguins; dinosaurs; fungi; tardigrades;
vaccines; the immune system; sleep; hydration; meditation; strength training; the human heart; the brain; nutrition;
sourdough bread; coffee brewing; fermentation; spices; chocolate; olive oil; pasta; tea ceremonies; street food;
budgeting; compound interest; inflation; index funds; credit scores; small businesses; remote work; job interviews;
the internet; encryption; open-source software; smartphones; artificial intelligence; robotics; 3D printing;
quantum computers; GPS; batteries; the periodic table; magnets; rainbows; lightning; snowflakes; glaciers; deserts;
the Amazon river; the Himalayas; Iceland; Japan; Kenya; Peru; Canada; New Zealand; Morocco; Norway; Vietnam;
jazz; classical music; learning the guitar; photography; oil painting; origami; chess; board games; video games;
the Olympic Games; football; marathon running; swimming; cycling; yoga; rock climbing; sailing; gardening;
houseplants; composting; beekeeping; bird watching; astronomy as a hobby; the solar system; Mars; comets; telescopes;
public libraries; museums; poetry; Shakespeare; fairy tales; mythology; the history of writing; languages; dialects;
time management; public speaking; negotiation; leadership; teamwork; habits; procrastination; motivation;
friendship; moving to a new city; first jobs; studying for exams; online courses; note-taking; memory techniques;
bridges; skyscrapers; trains; airplanes; submarines; lighthouses; castles; ancient Greece; the Vikings; the Maya;
clocks; calendars; money; banks; taxes; insurance; supply chains; shipping containers; the stock market; startups;
cats; dogs; horses; owls; bats; spiders; ants; sharks; whales; frogs; snakes; butterflies; crows; parrots; camels;
hedgehogs; squirrels; salmon migration; pollination; seeds; trees in winter; mushrooms; moss; cacti; bamboo; soil;
rivers; wetlands; caves; islands; tsunamis; hurricanes; tornadoes; fog; clouds; the ozone layer; air pollution;
plastic waste; clean water; nuclear power; hydropower; geothermal energy; hydrogen fuel; the power grid; insulation;
heat pumps; LED lighting; tiny houses; urban gardens; public transport; bicycles in cities; high-speed rail; ferries;
airports; traffic jams; self-driving cars; drones; satellites; the International Space Station; rockets; the Big Bang;
exoplanets; the Milky Way; eclipses; meteor showers; the seasons; time zones; leap years; maps; compasses; navigation;
the metric system; prime numbers; fractions; probability; statistics; geometry; algebra; infinity; zero; puzzles;
sudoku; crosswords; card games; magic tricks; circuses; theatre; opera; ballet; hip hop; film making; animation;
podcasts; radio; newspapers; social media; online privacy; passwords; spam email; cloud storage; data centres;
computer viruses; the keyboard; the mouse; printers; video calls; emojis; translation apps; search engines; Wikipedia;
libraries of the future; handwriting; calligraphy; knitting; sewing; pottery; woodworking; candle making; soap making;
baking bread; making jam; pickling vegetables; barbecue; vegetarian cooking; school lunches; breakfast; table manners;
tipping; birthdays; weddings; holidays around the world; New Year traditions; festivals; carnivals; fireworks;
museums of science; zoos; national parks; camping; hiking safety; first aid; sunscreen; allergies; the common cold;
headaches; posture; walking; stretching; breathing; laughter; stress; boredom; curiosity; creativity; kindness;
gratitude; patience; honesty; apologising; saying no; making decisions; setting goals; keeping a diary; minimalism;
decluttering; cleaning routines; laundry; ironing; moving house; renting a flat; buying a used car; saving energy at home;
pets and children; volunteering; charity; elections; democracy; the United Nations; human rights; the justice system;
juries; the police; firefighters; nurses; teachers; farmers; fishermen; architects; librarians; pilots; chefs;
the wheel; the steam engine; electricity; the light bulb; the telephone; television; the radio; penicillin; x-rays;
the microscope; the telescope; paper; glass; steel; concrete; cotton; wool; silk; rubber; salt; sugar; rice; wheat;
potatoes; corn; tomatoes; apples; bananas; coffee farming; cocoa farming; vineyards; cheese making; yoghurt; ice cream
""")

AUDIENCES = _items("a ten-year-old; a complete beginner; a university student; a busy manager; a grandparent; "
                   "a curious teenager; an expert; a new employee")

STYLES = _items("""
Keep it under 100 words.; Use bullet points.; Answer in one paragraph.; Use a friendly tone.; Be concise.;
Include a concrete example.; Use simple words.; Structure the answer with short headings.; End with a short summary.;
Give at least three points.; Write it in a formal tone.; Make it fun to read.
""")

GENERAL_TEMPLATES = _items("""
Explain {topic} in simple terms.; What is {topic}, and why does it matter?; Give me {n} interesting facts about {topic}.;
Write a short blog post about {topic}.; Write a short poem about {topic}.; What are the pros and cons of {topic}?;
Describe the history of {topic} briefly.; How would you explain {topic} to {audience}?;
Write a short story that involves {topic}.; Create a quiz with {n} questions about {topic}, with answers.;
What are common misconceptions about {topic}?; Write an engaging introduction for a talk on {topic}.;
List {n} questions a beginner might ask about {topic}, and answer them.; Compare {topic} and {other}.;
What could the future of {topic} look like?; Write a haiku about {topic}.; Summarise what everyone should know about {topic}.;
Give me a reading plan to learn about {topic} in {n} weeks.; Write a product description for a book about {topic}.;
What are {n} surprising things about {topic}?; Write a dialogue between two friends discussing {topic}.;
Why do people find {topic} fascinating?; Write a limerick about {topic}.; What are the key terms to know about {topic}?
""")

LANGUAGES = _items("Python; JavaScript; TypeScript; Java; C; C++; Rust; Go; Bash; SQL; Ruby; Kotlin")

CODE_TASKS = _items("""
reverses a string; checks whether a word is a palindrome; returns the n-th Fibonacci number; counts word frequencies in a text;
reads a CSV file and prints the sum of one column; performs binary search on a sorted array; removes duplicates from a list;
computes the factorial of a number; flattens a nested list; validates an email address with a regular expression;
finds the largest element of an array; converts Celsius to Fahrenheit; checks whether a number is prime;
counts the vowels in a string; transposes a matrix; computes the greatest common divisor of two numbers;
splits a sentence into words; finds the second largest number in a list; capitalises every word in a sentence;
generates a random password; checks whether two strings are anagrams; computes the average of a list of numbers;
rotates an array by k positions; implements a simple stack; implements a queue with two stacks; parses a date string;
sums the digits of an integer; converts a decimal number to binary; finds common elements of two lists; implements FizzBuzz
""")

CODE_CONCEPTS = _items("""
recursion; closures; big-O notation; hash tables; garbage collection; REST APIs; unit testing; version control with git;
object-oriented programming; functional programming; pointers; linked lists; binary trees; dynamic programming;
regular expressions; exceptions and error handling; type systems; compilers and interpreters; immutability;
dependency injection; caching; SQL joins; database indexes; event loops; memory leaks; design patterns; code review;
continuous integration; containers; virtual environments; JSON; HTTP status codes; sorting algorithms; hashing passwords
""")

CODE_TEMPLATES = _items("""
Write a {lang} function that {task}.; How do I write code in {lang} that {task}?; Write a {lang} program that {task}, with comments.;
Show me a {lang} snippet that {task} and explain how it works.; Write a {lang} function that {task}, and add a few tests.
""")

CONCEPT_PAIRS = _items("""
a list and a tuple; a compiler and an interpreter; a class and an object; a stack and a queue; SQL and NoSQL databases;
TCP and UDP; HTTP and HTTPS; git merge and git rebase; a library and a framework; static and dynamic typing;
an array and a linked list; a function and a method; synchronous and asynchronous code; unit tests and integration tests;
a shallow copy and a deep copy; inheritance and composition; a variable and a constant; recursion and iteration;
a hash map and a binary search tree; breadth-first and depth-first search; a pointer and a reference;
an abstract class and an interface; a virtual machine and a container; a GET and a POST request;
frontend and backend development
""")
CONCEPT_PAIR_TEMPLATES = _items("""
What is the difference between {pair}?; Explain the difference between {pair}, with a short example of each.;
When would you choose one over the other: {pair}?; Compare {pair} in a short table.
""")

CONCEPT_TEMPLATES = _items("""
Explain {concept} with a short example.; What is {concept} in programming?; When should I use {concept}?;
What are common mistakes with {concept}?; Explain {concept} to a junior developer.; Give an example of {concept} in {lang}.
""")

SNIPPETS = (
    "def f(xs):\n    out = []\n    for x in xs:\n        if x % 2 == 0:\n            out.append(x * x)\n    return out",
    "def count(s):\n    d = {}\n    for ch in s:\n        d[ch] = d.get(ch, 0) + 1\n    return d",
    "function total(items) {\n  return items.reduce((sum, item) => sum + item.price * item.qty, 0);\n}",
    "SELECT name, COUNT(*) AS orders\nFROM customers JOIN orders ON customers.id = orders.customer_id\nGROUP BY name\nORDER BY orders DESC;",
    "for i in range(1, 11):\n    print(i, 'squared is', i ** 2)",
    "def avg(nums):\n    return sum(nums) / len(nums)\n\nprint(avg([]))",
    "def find(items, target):\n    for i in range(len(items)):\n        if items[i] == target:\n            return i\n    return -1",
    "let names = ['ada', 'linus', 'grace'];\nlet upper = names.map(n => n[0].toUpperCase() + n.slice(1));\nconsole.log(upper);",
    "def is_even(n):\n    if n % 2 == 1:\n        return True\n    return False",
    "#!/bin/bash\nfor f in *.txt; do\n  wc -l \"$f\"\ndone",
    "class Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self):\n        self.n += 1\n        return self.n",
    "def last(xs):\n    return xs[len(xs)]",
)

SNIPPET_TEMPLATES = _items("Explain what this code does:; Is there a bug in this code? If so, fix it.; "
                           "How could this code be improved?; Add comments to this code:; Rewrite this code to be more readable:")

MESSAGE_TONES = _items("polite; friendly; short; warm; formal; apologetic; cheerful; professional")
MESSAGE_CASES = _items("""
a friend, turning down an invitation to a birthday dinner because I am ill;
my manager, asking to move our meeting to Thursday; a colleague, thanking them for covering my shift;
my neighbour, asking them to water my plants while I am away; a customer, explaining that their refund is on its way;
my landlord, giving notice that I will move out in two months; a teacher, explaining why my son missed school;
a client, sending the final version of a design and asking for feedback; my team, inviting them to a farewell lunch;
an old friend, suggesting we meet for coffee after many years; a hotel, asking for a late check-out;
a shop, asking whether a sold-out jacket will be back in stock; my gym, cancelling my membership;
a job applicant, inviting them to a second interview; a plumber, asking for a quote to fix a boiler;
a relative, congratulating them on their new baby; a volunteer group, declining to join this year because I am busy;
my flatmate, asking them to keep the kitchen tidier; a conference organiser, withdrawing from a talk I agreed to give
""")
MESSAGE_TEMPLATES = _items("Write a {tone} message to {case}.; Write a {tone} email to {case}.; "
                           "Draft a {tone} text message to {case}.")

WRITING_TASKS = _items("""
Write an email to my landlord asking to fix a leaking tap.; Write a thank-you note to a teacher who helped me a lot.;
Write a short speech for my sister's graduation.; Write a cover letter for a job as a junior graphic designer.;
Write a message to my team announcing that the project deadline has moved by one week.;
Write a review of a small Italian restaurant I enjoyed.; Write an invitation to a neighbourhood picnic.;
Write a complaint to an airline about lost luggage.; Write a birthday message for a colleague.;
Write a short bio for a freelance photographer's website.; Write a reminder email about an overdue invoice.;
Write a LinkedIn post celebrating five years at my company.; Write a note to a neighbour about a noisy party.;
Write an out-of-office reply for a two-week holiday.; Write a product announcement for a new reusable water bottle.;
Write instructions for a house sitter looking after two dogs.; Write an apology to a customer whose order arrived late.;
Write a welcome message for new members of a book club.; Write a request to my manager for a day of remote work.
""")

GOALS = _items("""
learn to cook healthy meals; save money for a holiday; sleep better; run my first 10 km; learn Spanish; keep my desk organised;
read more books; start a vegetable garden; get better at drawing; prepare for a job interview; reduce screen time;
learn to play the piano; make new friends in a new city; drink more water; start journaling; learn basic statistics;
become a better listener; plan a small wedding; train for a hiking trip; learn to swim; build an emergency fund
""")

CONSTRAINTS = _items("""
practising 15 minutes a day; on a small budget; while working full time; with no equipment; in two months;
with only weekends free; as someone over sixty; with two small children at home; without a car; starting from zero
""")

PLAN_TEMPLATES = _items("""
Give me a step-by-step plan to {goal}, {constraint}.; I want to {goal}, {constraint}. What do you suggest?;
How can I {goal}?; Give me a {n}-week plan to {goal}.; What are the first steps to {goal}?; I want to {goal}. Where should I start?;
What mistakes should I avoid if I want to {goal}?; Make a checklist to help me {goal}.
""")

PLACES = _items("Rome; Kyoto; Barcelona; Edinburgh; Lisbon; Istanbul; Mexico City; Vancouver; Cape Town; Prague; "
                "Seoul; Buenos Aires; Copenhagen; Marrakech; Sydney; Vienna; Hanoi; Dublin")

TRAVEL_TEMPLATES = _items("""
Plan a {n}-day trip to {place}.; What should I pack for a week in {place}?; What food should I try in {place}?;
What are good day trips from {place}?; Give me tips for visiting {place} on a budget.
""")

DISHES = _items("pancakes; a vegetable soup; guacamole; fried rice; a banana bread; hummus; a tomato pasta sauce; "
                "an omelette; overnight oats; a lentil stew; roast potatoes; a simple curry; fresh lemonade")

RECIPE_TEMPLATES = _items("How do I make {dish}?; Give me a recipe for {dish} for {n} people.; "
                          "What can I add to {dish} to make it more interesting?; How do I make {dish} without an oven?")

QUESTIONS = _items("""
Why is the sky blue?; How do airplanes stay in the air?; Why do we have seasons?; How does a refrigerator work?;
What causes the northern lights?; Why do leaves change colour in autumn?; How do vaccines train the immune system?;
What is the speed of light?; Why does ice float on water?; How do bees make honey?; What is a light-year?;
How does the heart pump blood?; Why do we dream?; How are rainbows formed?; Why is the ocean salty?;
How does a microwave oven heat food?; What is DNA?; How do magnets work?; Why do onions make you cry?;
What is the tallest mountain in the world?; How do submarines dive and surface?; Why do stars twinkle?;
How does the stock market work?; What is inflation?; How do noise-cancelling headphones work?; Why do we yawn?;
How do solar panels produce electricity?; What is the greenhouse effect?; How does a compass work?;
Why do dogs wag their tails?; How do plants know which way is up?; What is the difference between weather and climate?;
What is the difference between a virus and a bacterium?; What is the difference between a lake and a pond?;
Who invented the telephone?; How long does it take light from the Sun to reach Earth?; What is a calorie?;
How does Wi-Fi work?; Why do we need sleep?; How do fish breathe underwater?; What is an atom made of?;
Why do dogs sniff everything?; Why do birds sing in the morning?; How do bats find their way in the dark?;
Why do zebras have stripes?; How do chameleons change colour?; Why do giraffes have long necks?; How do ants find food?;
Why do we get goosebumps?; Why do we hiccup?; Why does our skin wrinkle in water?; How do we taste food?;
Why do we blink?; How do bones heal?; What does the liver do?; Why do we sneeze?; How do our eyes see colour?;
What is the difference between a comet and an asteroid?; What is the difference between a star and a planet?;
What is the difference between an alligator and a crocodile?; What is the difference between baking soda and baking powder?;
What is the difference between a hurricane, a typhoon and a cyclone?; What is the difference between a frog and a toad?;
What is the difference between speed and velocity?; What is the difference between mass and weight?;
What is the difference between a democracy and a republic?; What is the difference between a mortgage and a loan?;
What is the difference between RAM and storage?; What is the difference between a mammal and a reptile?;
Why does bread go stale?; Why does metal feel colder than wood?; Why do cakes rise in the oven?; Why is glass transparent?;
How does soap clean things?; How does a thermometer work?; Why does the Moon have phases?; What causes tides?;
Why is Mars red?; How hot is the Sun?; How far away is the Moon?; How do volcanoes form?; What causes earthquakes?;
Why does thunder follow lightning?; How are clouds formed?; Why is snow white?; How do glaciers move?;
Who built the pyramids?; Why did the Roman Empire fall?; Who was the first person to fly an airplane?;
When was the printing press invented, and why did it matter?; How did people tell the time before clocks?;
Why do we have leap years?; Why are there 60 minutes in an hour?; How did the Olympic Games start?;
What is a black hole?; What is gravity?; What is electricity?; What is a gene?; What is a galaxy?; What is an algorithm?;
What is a recession?; What is a budget deficit?; What is a credit card interest rate?; What is a carbon footprint?;
How do I know if an egg is fresh?; How long should I boil an egg?; Is it safe to eat raw cookie dough?;
How often should I water a cactus?; Why do my houseplants have yellow leaves?; How can I keep bread fresh for longer?
""")

DEVICES = _items("a dishwasher; a thermostat; the gears on a bicycle; an electric kettle; a smoke detector; a barcode scanner; "
                  "a touchscreen; a hearing aid; a washing machine; a hybrid car; an elevator; a pressure cooker; a QR code; "
                  "a camera lens; a credit card chip; a heat pump; a lock and key")

PEOPLE = _items("Marie Curie; Leonardo da Vinci; Isaac Newton; Ada Lovelace; Nelson Mandela; Cleopatra; Galileo Galilei; "
                "Frida Kahlo; Charles Darwin; Alan Turing; Jane Austen; Mozart; Rosalind Franklin; Nikola Tesla; "
                "Confucius; Florence Nightingale; Katherine Johnson; Ibn Battuta")

OCCASIONS = _items("a retirement party; a wedding anniversary; the birth of a baby; a friend's promotion; a school reunion; "
                   "Mother's Day; a farewell lunch for a colleague; a team's championship win; a housewarming; a graduation")

COUNTRIES = _items("France; Brazil; Egypt; India; Australia; Mexico; Poland; Thailand; Chile; Ghana; Sweden; Turkey")

QA_TEMPLATES = _items("How does {device} work?; What are the main parts of {device}, and what does each do?; "
                      "Who was {person}, and what are they known for?; Why is {person} remembered today?")

OCCASION_TEMPLATES = _items("Write a short speech for {occasion}.; Write a card message for {occasion}.; "
                            "Write a short poem for {occasion}.; Suggest five ideas to celebrate {occasion}.")

FACT_TEMPLATES = _items("What is the capital of {country}, and what is it known for?; What languages are spoken in {country}?; "
                        "Tell me about the geography of {country}.; What are traditional dishes from {country}?")

SYSTEM_PROMPTS = _items("""
You are a helpful assistant.; You are a concise assistant. Answer briefly.; You are a patient teacher.;
You are a friendly cooking assistant.; You are an expert programmer who explains things clearly.;
You are a cheerful tutor for children.; You are a careful assistant who answers step by step.;
You are a knowledgeable science communicator.; You are a friendly personal finance advisor.;
You are a supportive fitness coach.; You are a polite customer service agent.; You are a math tutor. Show your working.;
You are a writing assistant who helps people write clear messages.; You are a tour guide who loves local history.;
You are an assistant for a small company. Keep answers professional.; You are a gardening expert.;
You are a helpful assistant. Reply in plain language and avoid jargon.; You are a study buddy for high school students.;
You are an experienced software engineer doing code review.; You are a calm and practical life coach.
""")

SUMMARY_INSTRUCTIONS = _items("""
Summarise the following text in two sentences.; Give a short bullet-point summary of the text below.;
In short, what does this text say?; Write a one-paragraph summary of this:; What are the main points of the text below?;
Condense this text into three short sentences.; Write a headline and a one-sentence summary for this text.
""")

REWRITE_INSTRUCTIONS = _items("""
Rewrite the following text in a more formal tone.; Rewrite this so a child could understand it.;
Shorten this text to about half its length.; Turn the following text into a bulleted list.;
Improve the flow of this text and fix any mistakes.; Rewrite this text as a friendly email to a colleague.;
Rewrite the following text in the first person.; Make this text more enthusiastic.
""")

FOLLOW_UPS = _items("""
Can you give me a concrete example?; Can you make that shorter?; What are the most common mistakes people make with this?;
Thanks! Could you explain the first point in more detail?; How would this be different for a beginner?;
Can you put the key points in a table?; What should I read next to learn more?; Why is that?;
Could you give me a simpler version?; Can you summarise that in one sentence?; What would you add to that?;
I only have about ten minutes a day for this. Does that change your advice?; What if I am on a tight budget?;
I live in a small flat in a big city. Is that a problem?; My partner is not convinced. How can I explain it to them?;
Which of those would you start with, and why?; Is there anything I should be careful about?;
I tried that already and it did not work. What else can I do?; How long does that usually take?;
Can you explain that again, but for a twelve-year-old?; That sounds expensive. Is there a cheaper option?;
Could you turn that into a short checklist?; What is the single most important thing here?;
I am in a hurry. What is the quick version?; Are there any risks?; How would an expert do this differently?
""")

PROSE_SUMMARY_INSTRUCTIONS = _items("""
Summarise this in {k} sentences.; Give a {k}-sentence summary of this passage.; Summarise the following for a busy reader in {k} sentences.;
In {k} sentences, what is this text about?; Write a summary of this text in at most {k} sentences.;
Summarise this passage in plain language.; Give me the gist of this text.
""")


def _prose(answer: str) -> str:
    """An answer as plain running text: markdown marks, list bullets and line breaks removed."""
    lines = [re.sub(r"^\s*(?:[-*+]|\d+[.)]|#+)\s*", "", line).strip() for line in answer.splitlines()]
    text = " ".join(line for line in lines if line)
    return re.sub(r"\*\*|__|`", "", text)


def _first_sentences(answer: str, k: int) -> str:
    """The first k sentences of an answer as plain text (a short assistant turn)."""
    sentences = re.split(r"(?<=[.!?])\s+", _prose(answer))
    return " ".join(sentences[:k]).strip()


def _math_problems(rng: random.Random, n: int) -> list[str]:
    """Word problems and exercises with numbers drawn from `rng` (templates x random numbers)."""
    makers = (
        lambda: f"A shirt costs ${rng.randint(12, 90)} and is on sale for {rng.choice([10, 15, 20, 25, 30, 40])}% off. What is the sale price?",
        lambda: f"Solve for x: {rng.randint(2, 9)}x + {rng.randint(1, 30)} = {rng.randint(31, 99)}.",
        lambda: f"What is {rng.randint(12, 99)} multiplied by {rng.randint(12, 99)}? Show your working.",
        lambda: f"A rectangle is {rng.randint(3, 20)} cm wide and {rng.randint(21, 40)} cm long. What are its area and perimeter?",
        lambda: f"If I invest ${rng.choice([500, 1000, 2500, 5000])} at {rng.randint(2, 8)}% simple interest per year, how much interest do I earn in {rng.randint(2, 10)} years?",
        lambda: f"Find the derivative of {rng.randint(2, 9)}x^{rng.randint(2, 5)} + {rng.randint(2, 9)}x - {rng.randint(1, 9)}.",
        lambda: f"A recipe needs {rng.randint(2, 5)} eggs for {rng.choice([4, 6, 8])} pancakes. How many eggs do I need for {rng.choice([12, 18, 24, 30])} pancakes?",
        lambda: f"What is {rng.randint(1, 9)}/{rng.randint(10, 12)} plus {rng.randint(1, 5)}/{rng.randint(6, 9)}? Simplify the result.",
        lambda: f"A train leaves at {rng.randint(6, 11)}:{rng.choice(['00', '15', '30', '45'])} and the journey takes {rng.randint(2, 5)} hours and {rng.randint(5, 55)} minutes. When does it arrive?",
        lambda: f"Tom is {rng.randint(3, 9)} years older than Anna. In {rng.randint(2, 6)} years their ages will add up to {rng.randint(40, 70)}. How old is Anna now?",
        lambda: f"What is the probability of rolling a total of {rng.randint(3, 11)} with two fair dice?",
        lambda: f"Convert {rng.randint(2, 40)} miles to kilometres and explain the conversion.",
        lambda: f"One pipe fills a tank in {rng.randint(2, 6)} hours and another in {rng.randint(7, 12)} hours. How long do they take together?",
        lambda: f"What is the next number in the sequence {', '.join(str(rng.randint(1, 4) * k + rng.randint(0, 3)) for k in range(1, 6))}? Explain the pattern.",
        lambda: f"Solve the system: x + y = {rng.randint(10, 30)} and x - y = {rng.randint(1, 9)}.",
        lambda: f"What is {rng.randint(5, 45)}% of {rng.randint(80, 900)}?",
        lambda: f"Integrate {rng.randint(2, 9)}x^{rng.randint(1, 4)} with respect to x.",
        lambda: f"A class has {rng.randint(10, 20)} girls and {rng.randint(10, 20)} boys. What is the ratio of girls to boys in simplest form?",
        lambda: f"Factorise x^2 + {rng.randint(5, 13)}x + {rng.choice([6, 12, 20, 30, 36])}.",
        lambda: f"What is the mean and the median of {', '.join(str(rng.randint(1, 50)) for _ in range(rng.randint(5, 8)))}?",
        lambda: f"A car drives {rng.randint(20, 90)} km at {rng.choice([40, 50, 60, 80])} km/h and then {rng.randint(20, 90)} km at {rng.choice([90, 100, 120])} km/h. What is its average speed for the whole journey?",
        lambda: f"A runner covers {rng.randint(3, 15)} km in {rng.randint(20, 90)} minutes. What is her average speed in km/h?",
        lambda: f"In how many ways can {rng.randint(3, 8)} books be arranged on a shelf?",
        lambda: f"How many different teams of {rng.randint(2, 4)} can be chosen from {rng.randint(6, 12)} players?",
        lambda: f"A bag holds {rng.randint(2, 8)} red and {rng.randint(2, 8)} blue marbles. If I draw two without looking, what is the probability that both are red?",
        lambda: f"A price rises from ${rng.randint(20, 60)} to ${rng.randint(61, 120)}. What is the percentage increase?",
        lambda: f"{rng.randint(3, 8)} workers build a wall in {rng.randint(4, 12)} days. How long would {rng.randint(2, 12)} workers take at the same rate?",
        lambda: f"How many seconds are there in {rng.randint(2, 9)} hours and {rng.randint(1, 59)} minutes?",
        lambda: f"A map has a scale of 1:{rng.choice([25000, 50000, 100000])}. Two towns are {rng.randint(2, 15)} cm apart on the map. How far apart are they really?",
        lambda: f"The sum of three consecutive integers is {3 * rng.randint(10, 60)}. What are they?",
        lambda: f"A circle has a radius of {rng.randint(2, 15)} cm. What are its circumference and area?",
        lambda: f"Sam saves ${rng.randint(5, 40)} a week. How many weeks does he need to buy a bike that costs ${rng.randint(150, 600)}?",
        lambda: f"What is the least common multiple of {rng.randint(4, 15)} and {rng.randint(6, 20)}?",
        lambda: f"A triangle has sides of {rng.randint(3, 9)} cm, {rng.randint(4, 10)} cm and {rng.randint(5, 12)} cm. Is it a right triangle? Explain.",
        lambda: f"If a phone battery loses {rng.randint(5, 15)}% of its charge every hour, how long does a full battery last?",
    )
    return [makers[i % len(makers)]() for i in range(n)]


def _filled(template: str, rng: random.Random, **values: str) -> str:
    extra = {"n": str(rng.choice([3, 4, 5, 6])), "audience": rng.choice(AUDIENCES), "lang": rng.choice(LANGUAGES),
             "other": rng.choice(TOPICS), "constraint": rng.choice(CONSTRAINTS)}
    return template.format(**{**extra, **values})


def _candidates(rng: random.Random) -> list[tuple[str, str]]:
    """Every (text, category) the templates make, in a fixed order; random fillers from rng."""
    out: list[tuple[str, str]] = []
    for template, topic in itertools.product(GENERAL_TEMPLATES, TOPICS):
        out.append((_filled(template, rng, topic=topic), "general"))
    for template, lang, task in itertools.product(CODE_TEMPLATES, LANGUAGES, CODE_TASKS):
        out.append((_filled(template, rng, lang=lang, task=task), "code"))
    for template, concept in itertools.product(CONCEPT_TEMPLATES, CODE_CONCEPTS):
        out.append((_filled(template, rng, concept=concept), "code"))
    for template, pair in itertools.product(CONCEPT_PAIR_TEMPLATES, CONCEPT_PAIRS):
        out.append((template.format(pair=pair), "code"))
    for template, snippet in itertools.product(SNIPPET_TEMPLATES, SNIPPETS):
        out.append((f"{template}\n\n```\n{snippet}\n```", "code"))
    out.extend((text, "math") for text in _math_problems(rng, 2000))
    out.extend((text, "writing") for text in WRITING_TASKS)
    for template, tone, case in itertools.product(MESSAGE_TEMPLATES, MESSAGE_TONES, MESSAGE_CASES):
        out.append((template.format(tone=tone, case=case), "writing"))
    for template, goal in itertools.product(PLAN_TEMPLATES, GOALS):
        out.append((_filled(template, rng, goal=goal), "instructions"))
    for template, place in itertools.product(TRAVEL_TEMPLATES, PLACES):
        out.append((_filled(template, rng, place=place), "instructions"))
    for template, dish in itertools.product(RECIPE_TEMPLATES, DISHES):
        out.append((_filled(template, rng, dish=dish), "instructions"))
    out.extend((q, "qa") for q in QUESTIONS)
    out.extend((t.format(device=d), "qa") for t, d in itertools.product(QA_TEMPLATES[:2], DEVICES))
    out.extend((t.format(person=p), "qa") for t, p in itertools.product(QA_TEMPLATES[2:], PEOPLE))
    out.extend((t.format(occasion=o), "writing") for t, o in itertools.product(OCCASION_TEMPLATES, OCCASIONS))
    for template, country in itertools.product(FACT_TEMPLATES, COUNTRIES):
        out.append((template.format(country=country), "qa"))
    return out


# Share of each category in a prefix of make_instructions' output (until a category runs out).
CATEGORY_SHARES = {"general": 0.36, "code": 0.24, "math": 0.14, "instructions": 0.10, "qa": 0.10, "writing": 0.06}


def _balanced(candidates: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Distinct candidates, interleaved so every prefix follows CATEGORY_SHARES as far as it can."""
    by_category: dict[str, list[str]] = {c: [] for c in CATEGORY_SHARES}
    seen: set[str] = set()
    for text, category in candidates:
        if text not in seen:
            seen.add(text)
            by_category[category].append(text)
    taken = dict.fromkeys(by_category, 0)
    out: list[tuple[str, str]] = []
    while True:
        left = [c for c in by_category if taken[c] < len(by_category[c])]
        if not left:
            return out
        category = min(left, key=lambda c: (taken[c] / CATEGORY_SHARES[c], c))
        out.append((by_category[category][taken[category]], category))
        taken[category] += 1


def make_instructions(seed: int, n: int | None = None) -> list[Instruction]:
    """Distinct single-turn instructions (some with a style line or a system prompt), shuffled by seed.

    Deterministic in (seed, n); `n=None` returns all of them (about 7,400), and the first n
    follow CATEGORY_SHARES. Raises HeldoutOverlap if any shares text with the held-out prompts.
    """
    rng = random.Random(seed)
    candidates = _candidates(rng)
    rng.shuffle(candidates)
    result: list[Instruction] = []
    for text, category in _balanced(candidates):
        if category in ("general", "instructions") and rng.random() < 0.35:
            text = f"{text} {rng.choice(STYLES)}"
        messages: list[dict[str, str]] = [{"role": "user", "content": text}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        result.append(Instruction(tuple(messages), category))
        if n is not None and len(result) >= n:
            break
    check_disjoint(result)
    return result


def derive_instructions(pairs: list[tuple[Instruction, str]], seed: int, n: int) -> list[Instruction]:
    """Up to n instructions built on earlier answers: summarise, rewrite, or a follow-up chat turn.

    `pairs` are (instruction, answer text). Summaries ask for varied lengths of the answer as it is
    or as plain prose; follow-up chats keep the whole answer or only its first sentences as the
    assistant turn (as in chats people write), with a system prompt now and then. Answers shorter
    than 40 words are skipped, and so is any derived instruction sharing text with the held-out
    prompts (answers are model text).
    """
    rng = random.Random(seed + 1)
    usable = [(ins, ans.strip()) for ins, ans in pairs if len(ans.split()) >= 40]
    rng.shuffle(usable)
    held = _heldout_shingles()
    result: list[Instruction] = []
    for i, (instruction, answer) in enumerate(usable[:n]):
        kind = i % 3
        if kind == 0:
            if rng.random() < 0.5:
                ask = rng.choice(PROSE_SUMMARY_INSTRUCTIONS).format(k=rng.choice(["two", "three", "2", "3", "four"]))
                messages = ({"role": "user", "content": f"{ask}\n\n{_prose(answer)}"},)
            else:
                messages = ({"role": "user", "content": f"{rng.choice(SUMMARY_INSTRUCTIONS)}\n\n{answer}"},)
            category = "summarisation"
        elif kind == 1:
            passage = _prose(answer) if rng.random() < 0.5 else answer
            messages = ({"role": "user", "content": f"{rng.choice(REWRITE_INSTRUCTIONS)}\n\n{passage}"},)
            category = "rewriting"
        else:
            reply = _first_sentences(answer, rng.choice([2, 3])) if rng.random() < 0.6 else answer
            turns = tuple(m for m in instruction.messages if m["role"] != "system")
            if rng.random() < 0.35:
                turns = ({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},) + turns
            messages = turns + ({"role": "assistant", "content": reply},
                                {"role": "user", "content": rng.choice(FOLLOW_UPS)})
            category = "chat"
        if not any(_shingles(m["content"]) & held for m in messages):
            result.append(Instruction(messages, category))
    return result


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + _SHINGLE]) for i in range(len(words) - _SHINGLE + 1)}


def heldout_texts() -> list[str]:
    """Every message of the held-out prompt set."""
    from engine.prompts import load_prompts

    texts = []
    for prompt in load_prompts("heldout"):
        texts.extend(m["content"] for m in prompt.chat_messages())
    return texts


def _heldout_shingles() -> set[tuple[str, ...]]:
    return set().union(*(_shingles(t) for t in heldout_texts()))


def check_disjoint(instructions: list[Instruction]) -> None:
    """Raise HeldoutOverlap if an instruction contains a held-out message or shares an 8-word run with one."""
    held_texts = [t.lower() for t in heldout_texts()]
    held = _heldout_shingles()
    for instruction in instructions:
        for message in instruction.messages:
            content = message["content"].lower()
            if any(t in content for t in held_texts) or _shingles(content) & held:
                raise HeldoutOverlap(f"a training instruction overlaps engine/prompts/heldout.jsonl: {content[:80]!r}")
