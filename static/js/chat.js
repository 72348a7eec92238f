// The chat page's few behaviours htmx does not have: Enter sends, new content keeps the view
// at the bottom, and fragments marked data-upsert are appended when the page lacks them
// (a run started elsewhere, a reply that streams in before the send response lands).
(function () {
  "use strict";
  var list = function () { return document.getElementById("messages"); };
  var nearBottom = true;
  function stick() { var m = list(); if (m && nearBottom) m.scrollTop = m.scrollHeight; }

  document.addEventListener("scroll", function (e) {
    var m = list();
    if (e.target === m) nearBottom = m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }, true);

  // Upserts without htmx's oobErrorNoTarget, which htmx also logs as a console error: before
  // a socket frame is swapped, an empty element gets the id of each fragment the page lacks,
  // for the out-of-band swap to replace; a fragment going into an element that arrives in the
  // same frame (a tool card in a new reply bubble) is moved into it, and one with nowhere to
  // go is left out. The handler below stays for what this misses.
  if (window.htmx) {
    htmx.defineExtension("chat-upsert", {
      transformResponse: function (text) {
        if (typeof text !== "string" || text.indexOf("data-upsert") < 0) return text;
        var tpl = document.createElement("template");
        tpl.innerHTML = text;  // inert: nothing in a template runs or loads
        var moved = false;
        Array.prototype.slice.call(tpl.content.children).forEach(function (el) {
          if (!el.hasAttribute("data-upsert") || !el.id || document.getElementById(el.id)) return;
          var intoId = el.getAttribute("data-upsert-into") || "messages";
          // The frame's own copy first: it replaces the page's when swapped.
          var host = tpl.content.getElementById(intoId);
          if (host && !el.contains(host)) {
            el.removeAttribute("hx-swap-oob");
            host.appendChild(el);
            moved = true;
            return;
          }
          var into = document.getElementById(intoId);
          if (into) {
            var empty = document.getElementById("empty-note");
            if (empty) empty.remove();
            var slot = document.createElement(el.tagName);
            slot.id = el.id;
            into.appendChild(slot);
            return;
          }
          // Nowhere to go (a late tool event for a reply already stored and redrawn): the
          // handler below would drop it too.
          el.remove();
          moved = true;
        });
        return moved ? tpl.innerHTML : text;
      }
    });
  }

  document.body.addEventListener("htmx:oobErrorNoTarget", function (e) {
    var el = e.detail.content;
    if (!el || !el.hasAttribute || !el.hasAttribute("data-upsert")) return;
    var into = document.getElementById(el.getAttribute("data-upsert-into") || "messages");
    if (!into) return;
    var empty = document.getElementById("empty-note");
    if (empty) empty.remove();
    into.appendChild(el);
    htmx.process(el);
    stick();
  });

  // A send response whose reply placeholder arrived after the reply itself started.
  document.body.addEventListener("htmx:afterSwap", function () {
    document.querySelectorAll("[data-placeholder]").forEach(function (ph) {
      ph.removeAttribute("data-placeholder");
      var same = document.querySelectorAll("#" + CSS.escape(ph.id));
      if (same.length > 1) {
        same.forEach(function (other) { if (other !== ph) ph.replaceWith(other); });
      }
    });
    var empty = document.getElementById("empty-note");
    if (empty && list() && list().querySelector(".msg")) empty.remove();
    var box = document.querySelector("#composer textarea");
    if (box && (document.activeElement === document.body || !document.activeElement)) box.focus();
    stick();
  });
  document.body.addEventListener("htmx:wsAfterMessage", stick);

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && t.matches && t.matches("#composer textarea")) {
      e.preventDefault();
      if (t.value.trim()) t.form.requestSubmit();
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    var m = list();
    if (!m) return;
    if (location.hash) {
      var target = document.getElementById(location.hash.slice(1));
      if (target) { nearBottom = false; target.scrollIntoView({ block: "center" }); return; }
    }
    m.scrollTop = m.scrollHeight;
    var box = document.querySelector("#composer textarea");
    if (box) box.focus();
  });
})();
