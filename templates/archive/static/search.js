/* Starts Pagefind's search UI on the search page. A file, not inline script, so the page's
   Content Security Policy can forbid inline script altogether. */
(function () {
  "use strict";
  function start() {
    var el = document.getElementById("search");
    if (!el || typeof PagefindUI === "undefined") {
      return;
    }
    var here = document.baseURI;
    new PagefindUI({
      element: "#search",
      baseUrl: new URL(el.getAttribute("data-base"), here).pathname,
      bundlePath: new URL(el.getAttribute("data-bundle"), here).pathname,
      showImages: false,
      showSubResults: true
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
