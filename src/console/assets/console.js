// The console's only script: each time also in the browser's zone. The
// pages work without it.
(function () {
  "use strict";
  function local(iso) {
    var d = new Date(iso);
    if (isNaN(d.getTime())) { return null; }
    return d.toLocaleString(undefined, {
      year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    document.querySelectorAll(".browser-zone").forEach(function (el) {
      el.textContent = "; in grey, your browser's zone (" + zone + ")";
    });
    document.querySelectorAll("time[datetime]").forEach(function (el) {
      var text = local(el.getAttribute("datetime"));
      if (!text) { return; }
      var span = document.createElement("span");
      span.className = "local";
      span.textContent = text;
      el.after(span);
    });
    document.querySelectorAll("svg.timeline .tick tspan[data-time]").forEach(function (el) {
      var text = local(el.getAttribute("data-time"));
      if (text) {
        var title = document.createElementNS("http://www.w3.org/2000/svg", "title");
        title.textContent = el.getAttribute("data-time") + " UTC · " + text;
        el.parentNode.parentNode.appendChild(title);
      }
    });
  });
})();
