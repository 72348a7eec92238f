// Keeps relative times current between pushes, on every page: each
// <time class="ago" datetime="…"> (rendered by the {% ago %} tag, fleet/templatetags/timeago.py)
// gets its "5 minutes ago" text recounted by this browser's clock.
(function () {
  "use strict";
  // Django's `timesince`, to two adjacent units: "3 hours, 5 minutes".
  var UNITS = [
    ["year", 365 * 86400], ["month", 30 * 86400], ["week", 7 * 86400],
    ["day", 86400], ["hour", 3600], ["minute", 60]
  ];
  function since(seconds) {
    for (var i = 0; i < UNITS.length; i++) {
      var count = Math.floor(seconds / UNITS[i][1]);
      if (count > 0) {
        var text = plural(count, UNITS[i][0]);
        if (i + 1 < UNITS.length) {
          var rest = Math.floor((seconds - count * UNITS[i][1]) / UNITS[i + 1][1]);
          if (rest > 0) text += ", " + plural(rest, UNITS[i + 1][0]);
        }
        return text;
      }
    }
    return "0 minutes";
  }
  function plural(count, unit) {
    return count + "\u00a0" + unit + (count === 1 ? "" : "s");
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("time.ago[datetime]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(at)) el.textContent = since(Math.max(0, (now - at) / 1000)) + " ago";
    });
  }
  setInterval(tick, 30000);
  // Rows pushed or fetched meanwhile carry the server's text: count them by this clock too.
  document.addEventListener("htmx:wsAfterMessage", tick);
  document.addEventListener("htmx:afterSettle", tick);
})();
