// Preloaded (node -r) before the Node original's app.js by `python -m
// benchmarks --seed`: that app calls https://api.openai.com through
// cross-fetch, hard-coded; this sends those calls to SEED_UPSTREAM (the
// benchmark's fake upstream) instead.  Nothing else changes.
"use strict";
const Module = require("module");
const target = process.env.SEED_UPSTREAM;
const original = Module._load;
Module._load = function (request, parent, isMain) {
  const loaded = original.apply(this, arguments);
  if (request !== "cross-fetch" || !target) return loaded;
  const fetch = (url, options) =>
    loaded(String(url).replace("https://api.openai.com", target), options);
  Object.assign(fetch, loaded);
  fetch.default = fetch;
  return fetch;
};
